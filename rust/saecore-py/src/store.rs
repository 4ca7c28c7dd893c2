//! Python wrappers of `saecore::store`: the shard writer, the reader, and the CSC build.
//!
//! CSR batches arrive as 1-D numpy arrays and are read in place (no copy on the Python side); the
//! writer converts them into its shard buffer with the GIL released, and compression happens on the
//! writer's own threads. float16 values arrive as a uint16 view (`v.view(np.uint16)`).

use std::path::PathBuf;

use half::f16;
use half::slice::HalfBitsSliceExt;
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use saecore::store::{
    self as core, CscOptions, FeatureStore, FeaturesIn, RowPtrIn, ShardWriter, ValueDtype, ValuesIn, WriterOptions,
};

use crate::errors::{detach, CoreError};

fn dtype_name(obj: &Bound<'_, PyAny>) -> String {
    obj.getattr("dtype").map_or_else(|_| obj.get_type().to_string(), |d| d.to_string())
}

fn not_contiguous(name: &str) -> PyErr {
    PyValueError::new_err(format!("{name}: array must be 1-D and C-contiguous"))
}

enum RowPtrArg<'py> {
    I64(PyReadonlyArray1<'py, i64>),
    U64(PyReadonlyArray1<'py, u64>),
}

enum FeatureArg<'py> {
    I64(PyReadonlyArray1<'py, i64>),
    I32(PyReadonlyArray1<'py, i32>),
    U32(PyReadonlyArray1<'py, u32>),
}

enum ValueArg<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    F16Bits(PyReadonlyArray1<'py, u16>),
}

impl<'py> RowPtrArg<'py> {
    fn extract(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, i64>>() {
            return Ok(RowPtrArg::I64(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, u64>>() {
            return Ok(RowPtrArg::U64(a));
        }
        Err(PyValueError::new_err(format!("row_ptr: expected a 1-D int64 or uint64 array, got {}", dtype_name(obj))))
    }
    fn view(&self) -> PyResult<RowPtrIn<'_>> {
        Ok(match self {
            RowPtrArg::I64(a) => RowPtrIn::I64(a.as_slice().map_err(|_| not_contiguous("row_ptr"))?),
            RowPtrArg::U64(a) => RowPtrIn::U64(a.as_slice().map_err(|_| not_contiguous("row_ptr"))?),
        })
    }
}

impl<'py> FeatureArg<'py> {
    fn extract(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, i64>>() {
            return Ok(FeatureArg::I64(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, i32>>() {
            return Ok(FeatureArg::I32(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, u32>>() {
            return Ok(FeatureArg::U32(a));
        }
        Err(PyValueError::new_err(format!("feature: expected a 1-D int64, int32 or uint32 array, got {}", dtype_name(obj))))
    }
    fn view(&self) -> PyResult<FeaturesIn<'_>> {
        Ok(match self {
            FeatureArg::I64(a) => FeaturesIn::I64(a.as_slice().map_err(|_| not_contiguous("feature"))?),
            FeatureArg::I32(a) => FeaturesIn::I32(a.as_slice().map_err(|_| not_contiguous("feature"))?),
            FeatureArg::U32(a) => FeaturesIn::U32(a.as_slice().map_err(|_| not_contiguous("feature"))?),
        })
    }
}

impl<'py> ValueArg<'py> {
    fn extract(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, f32>>() {
            return Ok(ValueArg::F32(a));
        }
        if let Ok(a) = obj.extract::<PyReadonlyArray1<'py, u16>>() {
            return Ok(ValueArg::F16Bits(a));
        }
        Err(PyValueError::new_err(format!(
            "value: expected a 1-D float32 array or a uint16 view of float16, got {}",
            dtype_name(obj)
        )))
    }
    fn view(&self) -> PyResult<ValuesIn<'_>> {
        Ok(match self {
            ValueArg::F32(a) => ValuesIn::F32(a.as_slice().map_err(|_| not_contiguous("value"))?),
            ValueArg::F16Bits(a) => {
                let bits: &[u16] = a.as_slice().map_err(|_| not_contiguous("value"))?;
                ValuesIn::F16(bits.reinterpret_cast::<f16>())
            }
        })
    }
}

/// Appends CSR batches to a sparse feature store (creates it, or resumes it after the last
/// committed shard). Shards are compressed and committed on background threads.
#[pyclass(module = "saecore._native", name = "FeatureStoreWriter")]
pub struct PyFeatureStoreWriter {
    inner: ShardWriter,
}

#[pymethods]
impl PyFeatureStoreWriter {
    #[new]
    // Every option is explicit: the defaults live once, in `saecore.encode.EncodeConfig`.
    #[pyo3(signature = (path, d_sae, *, value_dtype, shard_rows, spec_json, threads))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        d_sae: u32,
        value_dtype: &str,
        shard_rows: u64,
        spec_json: &str,
        threads: usize,
    ) -> PyResult<Self> {
        let options = WriterOptions {
            d_sae,
            value_dtype: ValueDtype::parse(value_dtype).map_err(CoreError)?,
            shard_rows,
            spec: core::parse_spec(spec_json).map_err(CoreError)?,
            threads,
        };
        let inner = detach(py, || ShardWriter::open(&path, options))?;
        Ok(PyFeatureStoreWriter { inner })
    }

    /// Token rows already committed when the store was opened: a resumed encode starts here.
    #[getter]
    fn rows_at_open(&self) -> u64 {
        self.inner.rows_at_open()
    }

    /// Token rows accepted so far.
    #[getter]
    fn rows_written(&self) -> u64 {
        self.inner.rows_written()
    }

    /// Shards committed so far.
    #[getter]
    fn shards_committed(&self) -> u64 {
        self.inner.shards_committed()
    }

    /// Whether the store is complete (finished now or before).
    #[getter]
    fn complete(&self) -> bool {
        self.inner.is_complete()
    }

    /// Append one CSR batch (GIL released while it is checked and copied).
    fn append(
        &mut self,
        py: Python<'_>,
        row_ptr: &Bound<'_, PyAny>,
        feature: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let (p, f, v) = (RowPtrArg::extract(row_ptr)?, FeatureArg::extract(feature)?, ValueArg::extract(value)?);
        let (p, f, v) = (p.view()?, f.view()?, v.view()?);
        let inner = &mut self.inner;
        detach(py, || inner.append(p, f, v))
    }

    /// Write the last partial shard, wait for all commits, mark the store complete. Returns the
    /// manifest as JSON text.
    fn finish(&mut self, py: Python<'_>) -> PyResult<String> {
        let inner = &mut self.inner;
        let manifest = detach(py, || inner.finish())?;
        Ok(manifest.to_json().to_string())
    }

    /// Stop without finishing (queued shards are committed; the partial buffer is dropped).
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        detach(py, || inner.close())
    }
}

/// Read-only view of a feature store, fixed to the shards committed when it was opened.
#[pyclass(module = "saecore._native", name = "FeatureStoreReader")]
pub struct PyFeatureStoreReader {
    inner: FeatureStore,
}

#[pymethods]
impl PyFeatureStoreReader {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = detach(py, || FeatureStore::open(&path))?;
        Ok(PyFeatureStoreReader { inner })
    }

    /// Number of features.
    #[getter]
    fn d_sae(&self) -> u32 {
        self.inner.d_sae()
    }

    /// Token rows in the committed shards.
    #[getter]
    fn n_rows(&self) -> u64 {
        self.inner.n_rows()
    }

    /// Stored activations in the committed shards.
    #[getter]
    fn nnz(&self) -> u64 {
        self.inner.nnz()
    }

    /// Committed shards.
    #[getter]
    fn num_shards(&self) -> usize {
        self.inner.num_shards()
    }

    /// Whether the writer finished.
    #[getter]
    fn complete(&self) -> bool {
        self.inner.is_complete()
    }

    /// Whether the feature-major copy exists.
    #[getter]
    fn has_csc(&self) -> bool {
        self.inner.manifest().csc.is_some()
    }

    /// Stored value dtype ("float16" or "float32").
    #[getter]
    fn value_dtype(&self) -> &'static str {
        self.inner.manifest().value_dtype.name()
    }

    /// The manifest as JSON text.
    fn manifest_json(&self) -> String {
        self.inner.manifest().to_json().to_string()
    }

    /// Shard `index` as `(row_start, row_ptr uint64, feature uint32, value float32)`, verified.
    #[allow(clippy::type_complexity)]
    fn read_shard<'py>(
        &self,
        py: Python<'py>,
        index: usize,
    ) -> PyResult<(u64, Bound<'py, PyArray1<u64>>, Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<f32>>)> {
        let inner = &self.inner;
        let s = detach(py, || inner.read_shard(index))?;
        Ok((s.row_start, s.row_ptr.into_pyarray(py), s.feature.into_pyarray(py), s.value.into_pyarray(py)))
    }

    /// Check every chunk's length and CRC-32C and that it decodes; raises CorruptDataError.
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        detach(py, || inner.verify())
    }

    /// Every activation of `feature` as `(rows uint64, values float32)`, rows ascending.
    fn activations<'py>(
        &self,
        py: Python<'py>,
        feature: i64,
    ) -> PyResult<(Bound<'py, PyArray1<u64>>, Bound<'py, PyArray1<f32>>)> {
        let d = self.inner.d_sae();
        let f = u32::try_from(feature)
            .ok()
            .filter(|&f| f < d)
            .ok_or_else(|| PyValueError::new_err(format!("feature id {feature} outside the valid range 0..{d}")))?;
        let inner = &self.inner;
        let (rows, values) = detach(py, || inner.feature_activations(f))?;
        Ok((rows.into_pyarray(py), values.into_pyarray(py)))
    }
}

/// Build the feature-major copy of the complete store at `path` (no-op if present); returns the
/// manifest as JSON text.
#[pyfunction]
#[pyo3(signature = (path, *, mem_budget_bytes, chunk_elems))]
fn build_csc(py: Python<'_>, path: PathBuf, mem_budget_bytes: u64, chunk_elems: u64) -> PyResult<String> {
    let options = CscOptions { mem_budget_bytes, chunk_elems };
    let manifest = detach(py, || core::build_csc(&path, &options))?;
    Ok(manifest.to_json().to_string())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyFeatureStoreWriter>()?;
    m.add_class::<PyFeatureStoreReader>()?;
    m.add_function(wrap_pyfunction!(build_csc, m)?)?;
    Ok(())
}
