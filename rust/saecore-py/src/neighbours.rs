//! Python wrappers of `saecore::neighbours`.
//!
//! Matrices arrive as C-contiguous 2-D numpy arrays of float32, or of uint16 holding float16 bits
//! (the Python layer passes `a.view(np.uint16)`, which keeps this binding free of a numpy f16 type).

use half::f16;
use half::slice::HalfBitsSliceExt;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use saecore::neighbours::{self as core, Blocking, Elements, MatrixRef};

use crate::errors::detach;

/// A borrowed input matrix in one of the accepted element types.
enum Input<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F16Bits(PyReadonlyArray2<'py, u16>),
}

impl<'py> Input<'py> {
    fn extract(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, f32>>() {
            return Ok(Input::F32(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray2<'py, u16>>() {
            return Ok(Input::F16Bits(a));
        }
        Err(PyValueError::new_err(format!(
            "matrix {name}: expected a 2-D float32 array or a uint16 view of float16, got {}",
            obj.getattr("dtype").map_or_else(|_| obj.get_type().to_string(), |d| d.to_string())
        )))
    }

    /// The core's view of the matrix; errors (naming the matrix) when it is not C-contiguous.
    fn view<'a>(&'a self, name: &'a str) -> PyResult<MatrixRef<'a>> {
        let not_contiguous = |_| PyValueError::new_err(format!("matrix {name}: array must be C-contiguous"));
        let (elements, shape) = match self {
            Input::F32(a) => (Elements::F32(a.as_slice().map_err(not_contiguous)?), a.shape()),
            Input::F16Bits(a) => {
                let bits: &[u16] = a.as_slice().map_err(not_contiguous)?;
                (Elements::F16(bits.reinterpret_cast::<f16>()), a.shape())
            }
        };
        MatrixRef::new(name, elements, shape[0], shape[1]).map_err(|e| crate::errors::CoreError(e).into())
    }
}

fn blocking(tile: Option<usize>, rows: usize) -> Blocking {
    tile.map_or_else(|| Blocking::for_rows(rows), |tile| Blocking { tile })
}

/// Top-k cosine neighbours of every row of `a` among the rows of `b` (or of `a`, itself excluded).
/// Returns `(indices uint32 [n, k], cosines float32 [n, k])`, best first, ties to the smaller index.
#[pyfunction]
#[pyo3(signature = (a, b, k, *, tile, name_a, name_b))]
#[allow(clippy::type_complexity)]
fn neighbours_top_k<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: Option<&Bound<'py, PyAny>>,
    k: usize,
    tile: Option<usize>,
    name_a: &str,
    name_b: &str,
) -> PyResult<(Bound<'py, PyArray2<u32>>, Bound<'py, PyArray2<f32>>)> {
    let ia = Input::extract(a, name_a)?;
    let ib = b.map(|b| Input::extract(b, name_b)).transpose()?;
    let ma = ia.view(name_a)?;
    let mb = ib.as_ref().map(|b| b.view(name_b)).transpose()?;
    let n_max = ma.rows().max(mb.map_or(0, |m| m.rows()));
    let blocking = blocking(tile, n_max);
    let out = detach(py, || core::top_k(&ma, mb.as_ref(), k, blocking))?;
    let shape = [out.rows, out.k];
    Ok((out.indices.into_pyarray(py).reshape(shape)?, out.cosines.into_pyarray(py).reshape(shape)?))
}

/// Every pair with cosine >= `threshold`, sorted by row, cosine descending, column. Returns
/// `(rows uint32 [m], cols uint32 [m], cosines float32 [m])`.
#[pyfunction]
#[pyo3(signature = (a, b, threshold, *, max_pairs, tile, name_a, name_b))]
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn neighbours_threshold<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: Option<&Bound<'py, PyAny>>,
    threshold: f32,
    max_pairs: usize,
    tile: Option<usize>,
    name_a: &str,
    name_b: &str,
) -> PyResult<(Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<f32>>)> {
    let ia = Input::extract(a, name_a)?;
    let ib = b.map(|b| Input::extract(b, name_b)).transpose()?;
    let ma = ia.view(name_a)?;
    let mb = ib.as_ref().map(|b| b.view(name_b)).transpose()?;
    let n_max = ma.rows().max(mb.map_or(0, |m| m.rows()));
    let blocking = blocking(tile, n_max);
    let out = detach(py, || core::above_threshold(&ma, mb.as_ref(), threshold, max_pairs, blocking))?;
    Ok((out.rows.into_pyarray(py), out.cols.into_pyarray(py), out.cosines.into_pyarray(py)))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(neighbours_top_k, m)?)?;
    m.add_function(wrap_pyfunction!(neighbours_threshold, m)?)?;
    Ok(())
}
