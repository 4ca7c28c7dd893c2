//! Writing the store's Zarr v3 nodes with the `zarrs` crate.
//!
//! Every array is one-dimensional with the codec chain `bytes → numcodecs.shuffle(E) → zstd`, which
//! zarr-python (with numcodecs ≥ 0.15) decodes out of the box. Chunks are encoded here one at a time
//! (the caller parallelises across chunks), and chunks equal to the fill value are still written, so
//! that a missing file always means damage rather than "all zeros".

use std::path::Path;
use std::sync::Arc;

use zarrs::array::codec::{ShuffleCodec, ZstdCodec};
use zarrs::array::builder::ArrayBuilderFillValue;
use zarrs::array::{data_type, Array, ArrayBuilder, ArrayBytes, DataType};
use zarrs::filesystem::FilesystemStore;
use zarrs::group::GroupBuilder;
use zarrs::array::codec::api::CodecOptions;

use super::format::ZSTD_LEVEL;
use crate::error::{Error, Result};

/// Element type of a store array.
#[derive(Clone, Copy, Debug)]
pub enum Elem {
    /// `uint64` (row pointers, rows).
    U64,
    /// `uint32` (feature ids).
    U32,
    /// `float16` values.
    F16,
    /// `float32` values.
    F32,
}

impl Elem {
    fn data_type(self) -> DataType {
        match self {
            Elem::U64 => data_type::uint64(),
            Elem::U32 => data_type::uint32(),
            Elem::F16 => data_type::float16(),
            Elem::F32 => data_type::float32(),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Elem::U64 => 8,
            Elem::U32 | Elem::F32 => 4,
            Elem::F16 => 2,
        }
    }
}

/// A Zarr hierarchy rooted at a folder on disk.
pub struct ZarrDir {
    store: Arc<FilesystemStore>,
    root: std::path::PathBuf,
}

fn zerr(root: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::io(root, std::io::Error::other(format!("writing {what}: {e}")))
}

impl ZarrDir {
    /// Open (creating if needed) the folder `root` as a Zarr store.
    pub fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let store = FilesystemStore::new(root).map_err(|e| zerr(root, "store", e))?;
        Ok(ZarrDir { store: Arc::new(store), root: root.to_path_buf() })
    }

    /// Write a group node at `path` (`"/"` for the root) with `attributes`.
    pub fn group(&self, path: &str, attributes: serde_json::Map<String, serde_json::Value>) -> Result<()> {
        let group = GroupBuilder::new()
            .attributes(attributes)
            .build(self.store.clone(), path)
            .map_err(|e| zerr(&self.root, path, e))?;
        group.store_metadata().map_err(|e| zerr(&self.root, path, e))
    }

    /// Write the metadata of a 1-D array of `len` elements in chunks of `chunk_elems`.
    pub fn array(&self, path: &str, elem: Elem, len: u64, chunk_elems: u64) -> Result<ZarrArray> {
        let fill: ArrayBuilderFillValue = match elem {
            Elem::U64 | Elem::U32 => 0u32.into(),
            Elem::F16 | Elem::F32 => 0.0f32.into(),
        };
        let array = ArrayBuilder::new(vec![len], vec![chunk_elems.max(1)], elem.data_type(), fill)
            .bytes_to_bytes_codecs(vec![Arc::new(ShuffleCodec::new(elem.size())), Arc::new(ZstdCodec::new(ZSTD_LEVEL, false))])
            .build(self.store.clone(), path)
            .map_err(|e| zerr(&self.root, path, e))?;
        array.store_metadata().map_err(|e| zerr(&self.root, path, e))?;
        Ok(ZarrArray { array, path: path.to_string(), root: self.root.clone() })
    }
}

/// One array being written.
pub struct ZarrArray {
    array: Array<FilesystemStore>,
    path: String,
    root: std::path::PathBuf,
}

impl ZarrArray {
    /// Encode and store chunk `index` from little-endian element bytes (a full chunk: the edge
    /// chunk is padded to the chunk length, as Zarr's regular grid requires).
    pub fn store_chunk(&self, index: u64, bytes: Vec<u8>) -> Result<()> {
        let options = CodecOptions::default().with_store_empty_chunks(true).with_concurrent_target(1);
        self.array
            .store_chunk_opt(&[index], ArrayBytes::new_flen(bytes), &options)
            .map_err(|e| zerr(&self.root, &format!("{} chunk {index}", self.path), e))
    }
}
