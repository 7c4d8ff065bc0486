//! The serving copy of a GGUF: its weights re-quantized to a type whose
//! batched matrix products are fast on this CPU.
//!
//! llama.cpp multiplies a batch of rows (8 concurrent sequences decoding, or a
//! prompt) by a Q8_0 matrix with a tiled kernel, but a legacy 4- and 5-bit
//! type such as Q4_1 falls back to one dot product per row and column, so a
//! batch of 8 costs nearly 8 single decodes. Re-quantizing Q4_1 to Q8_0 is
//! close to lossless (every Q4_1 value `d·q + m` is kept to 8 bits per
//! 32-value block) and stays quantized in memory.
//!
//! Q4_0 and IQ4_NL copies are smaller still and faster on this hardware:
//! llama.cpp repacks both into 8x8 interleaved blocks with AVX2/AVX-512
//! kernels for one row and for many. Both are lossy re-quantizations of the
//! file (its 4-bit values are rounded again to another 4-bit grid), so they
//! are chosen per model (`weights = "iq4_nl"`), never by default.
//!
//! The copy is made once, next to the HF conversions in the cache, under a
//! name that changes with the source file's path, size and modification time.

use std::path::{Path, PathBuf};

use crate::hf;

/// The serving format of a GGUF's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Q8_0 when the file's weights are a legacy 4/5-bit type (Q4_0, Q4_1,
    /// Q5_0, Q5_1) whose batched products are slow; the file as it is otherwise.
    #[default]
    Auto,
    /// The file as it is.
    AsStored,
    /// Always a Q8_0 copy (unless the file already is Q8_0).
    Q8_0,
    /// A Q4_0 copy: llama.cpp repacks Q4_0 into 8x8 interleaved blocks on
    /// AVX2 CPUs, with tiled kernels for one row and for many.
    Q4_0,
    /// An IQ4_NL copy (4-bit non-linear codebook, same size as Q4_0 and
    /// repacked alike on AVX2).
    Iq4Nl,
}

/// A `weights` value that names no [`WeightFormat`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown weight format `{0}` (expected auto, as-stored, q8_0, q4_0 or iq4_nl)")]
pub struct UnknownWeightFormat(pub String);

impl WeightFormat {
    pub fn parse(text: &str) -> Result<WeightFormat, UnknownWeightFormat> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => Ok(WeightFormat::Auto),
            "as-stored" | "as_stored" | "stored" => Ok(WeightFormat::AsStored),
            "q8_0" | "q8-0" => Ok(WeightFormat::Q8_0),
            "q4_0" | "q4-0" => Ok(WeightFormat::Q4_0),
            "iq4_nl" | "iq4-nl" => Ok(WeightFormat::Iq4Nl),
            other => Err(UnknownWeightFormat(other.to_string())),
        }
    }

    /// The llama.cpp ftype of a copy in this format, and its name.
    fn target(self) -> Option<(u32, &'static str)> {
        match self {
            WeightFormat::Auto | WeightFormat::Q8_0 => Some((FTYPE_Q8_0, "q8_0")),
            WeightFormat::Q4_0 => Some((FTYPE_Q4_0, "q4_0")),
            WeightFormat::Iq4Nl => Some((FTYPE_IQ4_NL, "iq4_nl")),
            WeightFormat::AsStored => None,
        }
    }
}

/// llama.cpp's `llama_ftype` numbers (`general.file_type`) of the types this
/// module reads.
const FTYPE_Q4_0: u32 = 2;
const FTYPE_Q4_1: u32 = 3;
const FTYPE_Q8_0: u32 = 7;
const FTYPE_Q5_0: u32 = 8;
const FTYPE_Q5_1: u32 = 9;
const FTYPE_IQ4_NL: u32 = 25;

/// Whether a model of `file_type` is served from a re-quantized copy under `format`.
pub fn wants_copy(format: WeightFormat, file_type: Option<u32>) -> bool {
    match format {
        WeightFormat::AsStored => false,
        WeightFormat::Auto => matches!(file_type, Some(FTYPE_Q4_0 | FTYPE_Q4_1 | FTYPE_Q5_0 | FTYPE_Q5_1)),
        other => other.target().map(|(ftype, _)| ftype) != file_type,
    }
}

/// Why a serving copy could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RequantError {
    #[error("cannot make the re-quantized serving copy of `{path}`: {message}")]
    Failed { path: PathBuf, message: String },
}

fn failed(path: &Path, message: impl Into<String>) -> RequantError {
    RequantError::Failed { path: path.to_path_buf(), message: message.into() }
}

/// Where the copy of `source` in `format` is (or would be) cached.
pub fn cache_path(source: &Path, format: WeightFormat) -> Result<PathBuf, RequantError> {
    let (_, type_name) = format.target().ok_or_else(|| failed(source, "no copy is made of a file served as stored"))?;
    let cache = hf::cache_dir().ok_or_else(|| failed(source, "no cache folder: set UNDERSTUDY_CACHE (or HOME)"))?;
    let canonical = std::fs::canonicalize(source).map_err(|error| failed(source, error.to_string()))?;
    let meta = std::fs::metadata(&canonical).map_err(|error| failed(source, error.to_string()))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |elapsed| elapsed.as_nanos());
    let key = format!("understudy-{type_name} v1\n{}\n{} {mtime}\n", canonical.display(), meta.len());
    Ok(cache.join(hf::cached_name(&canonical, &key, &format!("{type_name}.gguf"))))
}

/// The copy of the GGUF `source` in `format`, made with llama.cpp's
/// quantizer on `n_threads` threads the first time and reused after.
pub fn serving_copy(source: &Path, format: WeightFormat, n_threads: usize) -> Result<PathBuf, RequantError> {
    let target = cache_path(source, format)?;
    let Some((ftype, type_name)) = format.target() else {
        return Ok(source.to_path_buf());
    };
    if target.is_file() {
        return Ok(target);
    }
    crate::backend().map_err(|error| failed(source, error.to_string()))?;
    let folder = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder).map_err(|error| failed(&target, error.to_string()))?;
    // Written under a temporary name and renamed: a killed run leaves no
    // half-written copy under the final name.
    let partial = tempfile::Builder::new()
        .prefix(".requantizing-")
        .suffix(".gguf")
        .tempfile_in(folder)
        .map_err(|error| failed(&target, error.to_string()))?;
    let to_c = |path: &Path| {
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| failed(path, "the path holds a NUL byte"))
    };
    let input = to_c(source)?;
    let output = to_c(partial.path())?;
    let started = std::time::Instant::now();
    // SAFETY: both paths are valid NUL-terminated strings that outlive the
    // call, and `params` is llama.cpp's own default with plain fields set.
    #[allow(unsafe_code)]
    let status = unsafe {
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.nthread = n_threads.max(1) as i32;
        params.ftype = ftype as llama_cpp_sys_2::llama_ftype;
        params.allow_requantize = true;
        params.quantize_output_tensor = true;
        llama_cpp_sys_2::llama_model_quantize(input.as_ptr(), output.as_ptr(), &params)
    };
    if status != 0 {
        return Err(failed(source, format!("llama.cpp's quantizer returned {status}")));
    }
    partial.persist(&target).map_err(|error| failed(&target, error.error.to_string()))?;
    tracing::info!(source = %source.display(), copy = %target.display(), seconds = started.elapsed().as_secs_f64(),
        "made the {type_name} serving copy");
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_requantizes_only_the_legacy_low_bit_types() {
        assert!(wants_copy(WeightFormat::Auto, Some(FTYPE_Q4_1)));
        assert!(wants_copy(WeightFormat::Auto, Some(FTYPE_Q5_0)));
        assert!(!wants_copy(WeightFormat::Auto, Some(FTYPE_Q8_0)));
        // F16 (1) and the K-quants (e.g. Q4_K_M, 15) have batched kernels.
        assert!(!wants_copy(WeightFormat::Auto, Some(1)));
        assert!(!wants_copy(WeightFormat::Auto, Some(15)));
        assert!(!wants_copy(WeightFormat::Auto, None));
        assert!(!wants_copy(WeightFormat::AsStored, Some(FTYPE_Q4_1)));
        assert!(wants_copy(WeightFormat::Q8_0, Some(1)));
        assert!(!wants_copy(WeightFormat::Q8_0, Some(FTYPE_Q8_0)));
        assert!(wants_copy(WeightFormat::Iq4Nl, Some(FTYPE_Q4_1)));
        assert!(!wants_copy(WeightFormat::Iq4Nl, Some(FTYPE_IQ4_NL)));
        assert!(wants_copy(WeightFormat::Q4_0, Some(FTYPE_Q8_0)));
        assert!(!wants_copy(WeightFormat::Q4_0, Some(FTYPE_Q4_0)));
    }

    #[test]
    fn each_format_has_its_own_cached_copy() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("m.gguf");
        std::fs::write(&source, b"GGUF").unwrap();
        let q8 = cache_path(&source, WeightFormat::Q8_0).unwrap();
        assert_eq!(cache_path(&source, WeightFormat::Auto).unwrap(), q8);
        let iq4 = cache_path(&source, WeightFormat::Iq4Nl).unwrap();
        assert!(q8.to_string_lossy().ends_with(".q8_0.gguf") && iq4.to_string_lossy().ends_with(".iq4_nl.gguf"));
        assert!(cache_path(&source, WeightFormat::AsStored).is_err());
    }

    #[test]
    fn formats_parse_and_unknown_ones_are_named() {
        assert_eq!(WeightFormat::parse("Q8_0"), Ok(WeightFormat::Q8_0));
        assert_eq!(WeightFormat::parse("as-stored"), Ok(WeightFormat::AsStored));
        assert_eq!(WeightFormat::parse("IQ4_NL"), Ok(WeightFormat::Iq4Nl));
        assert_eq!(WeightFormat::parse("q4_0"), Ok(WeightFormat::Q4_0));
        let error = WeightFormat::parse("q3").unwrap_err().to_string();
        assert!(error.contains("`q3`"), "{error}");
    }
}
