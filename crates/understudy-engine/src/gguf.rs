//! A small GGUF (version 3) writer: metadata key/values and f32 or f16 tensors.
//!
//! It writes what the engine itself needs to produce: LoRA adapters converted
//! from PEFT, HF checkpoints converted for serving ([`crate::hf`]), and the
//! tiny random models the tests load. Tensor shapes are
//! given in GGUF order (`ne[0]` is the fastest-varying dimension, i.e. the
//! reverse of a row-major/PyTorch shape).

use std::io::{self, Write};
use std::path::Path;

const ALIGNMENT: usize = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    StringArray(Vec<String>),
    F32Array(Vec<f32>),
    I32Array(Vec<i32>),
}

/// A tensor's values, in the GGML type they are written as.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// GGML type 0.
    F32(Vec<f32>),
    /// GGML type 1: IEEE half-precision bit patterns.
    F16(Vec<u16>),
}

impl TensorData {
    fn len(&self) -> usize {
        match self {
            TensorData::F32(values) => values.len(),
            TensorData::F16(values) => values.len(),
        }
    }

    fn ggml_type(&self) -> u32 {
        match self {
            TensorData::F32(_) => 0,
            TensorData::F16(_) => 1,
        }
    }

    fn n_bytes(&self) -> usize {
        match self {
            TensorData::F32(values) => values.len() * 4,
            TensorData::F16(values) => values.len() * 2,
        }
    }

    fn append_bytes(&self, out: &mut Vec<u8>) {
        match self {
            TensorData::F32(values) => values.iter().for_each(|value| out.extend_from_slice(&value.to_le_bytes())),
            TensorData::F16(values) => values.iter().for_each(|value| out.extend_from_slice(&value.to_le_bytes())),
        }
    }
}

/// A GGUF file being assembled in memory.
#[derive(Debug, Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, TensorData)>,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    pub fn add(&mut self, key: &str, value: GgufValue) {
        self.metadata.push((key.to_string(), value));
    }

    /// Adds an f32 tensor; `dims` in GGUF order (`dims[0]` varies fastest).
    pub fn add_tensor(&mut self, name: &str, dims: &[u64], data: Vec<f32>) -> io::Result<()> {
        self.add_tensor_data(name, dims, TensorData::F32(data))
    }

    /// Adds a tensor of f32 or f16 values; `dims` in GGUF order.
    pub fn add_tensor_data(&mut self, name: &str, dims: &[u64], data: TensorData) -> io::Result<()> {
        let n_elements: u64 = dims.iter().product();
        if n_elements != data.len() as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("tensor `{name}` has {} values for shape {dims:?}", data.len()),
            ));
        }
        self.tensors.push((name.to_string(), dims.to_vec(), data));
        Ok(())
    }

    pub fn write_to(&self, out: &mut impl Write) -> io::Result<()> {
        let mut header = Vec::new();
        header.extend_from_slice(b"GGUF");
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut header, key);
            write_value(&mut header, value);
        }
        let mut offset = 0usize;
        for (name, dims, data) in &self.tensors {
            write_string(&mut header, name);
            header.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for dim in dims {
                header.extend_from_slice(&dim.to_le_bytes());
            }
            header.extend_from_slice(&data.ggml_type().to_le_bytes());
            header.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = align(offset + data.n_bytes());
        }
        header.resize(align(header.len()), 0);
        out.write_all(&header)?;
        for (_, _, data) in &self.tensors {
            let mut bytes = Vec::with_capacity(align(data.n_bytes()));
            data.append_bytes(&mut bytes);
            bytes.resize(align(bytes.len()), 0);
            out.write_all(&bytes)?;
        }
        Ok(())
    }

    /// Writes the file (through a temporary file in the same folder, then a rename).
    pub fn write_file(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("gguf.tmp");
        {
            let mut file = io::BufWriter::new(std::fs::File::create(&tmp)?);
            self.write_to(&mut file)?;
            file.flush()?;
        }
        std::fs::rename(&tmp, path)
    }
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn write_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

// GGUF metadata value types.
const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

fn write_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U32(v) => {
            out.extend_from_slice(&TYPE_U32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        GgufValue::I32(v) => {
            out.extend_from_slice(&TYPE_I32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        GgufValue::F32(v) => {
            out.extend_from_slice(&TYPE_F32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        GgufValue::Bool(v) => {
            out.extend_from_slice(&TYPE_BOOL.to_le_bytes());
            out.push(u8::from(*v));
        }
        GgufValue::String(v) => {
            out.extend_from_slice(&TYPE_STRING.to_le_bytes());
            write_string(out, v);
        }
        GgufValue::StringArray(values) => {
            out.extend_from_slice(&TYPE_ARRAY.to_le_bytes());
            out.extend_from_slice(&TYPE_STRING.to_le_bytes());
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for v in values {
                write_string(out, v);
            }
        }
        GgufValue::F32Array(values) => {
            out.extend_from_slice(&TYPE_ARRAY.to_le_bytes());
            out.extend_from_slice(&TYPE_F32.to_le_bytes());
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        GgufValue::I32Array(values) => {
            out.extend_from_slice(&TYPE_ARRAY.to_le_bytes());
            out.extend_from_slice(&TYPE_I32.to_le_bytes());
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_tensor_data_are_aligned() {
        let mut writer = GgufWriter::new();
        writer.add("general.architecture", GgufValue::String("llama".into()));
        writer.add_tensor("a", &[3], vec![1.0, 2.0, 3.0]).unwrap();
        writer.add_tensor("b", &[2, 1], vec![4.0, 5.0]).unwrap();
        let mut bytes = Vec::new();
        writer.write_to(&mut bytes).unwrap();
        assert_eq!(&bytes[..4], b"GGUF");
        assert_eq!(bytes.len() % ALIGNMENT, 0);
        // The second tensor starts at the next aligned offset after the first one.
        let tail = &bytes[bytes.len() - 2 * ALIGNMENT..];
        assert_eq!(f32::from_le_bytes(tail[..4].try_into().unwrap()), 1.0);
        assert_eq!(f32::from_le_bytes(tail[ALIGNMENT..ALIGNMENT + 4].try_into().unwrap()), 4.0);
        assert!(writer.add_tensor("c", &[2, 2], vec![0.0]).is_err());
    }

    #[test]
    fn f16_tensors_take_two_bytes_a_value_and_stay_aligned() {
        let mut writer = GgufWriter::new();
        writer.add_tensor_data("h", &[3], TensorData::F16(vec![0x3c00, 0xc000, 0x0000])).unwrap();
        writer.add_tensor("f", &[1], vec![7.0]).unwrap();
        let mut bytes = Vec::new();
        writer.write_to(&mut bytes).unwrap();
        assert_eq!(bytes.len() % ALIGNMENT, 0);
        let tail = &bytes[bytes.len() - 2 * ALIGNMENT..];
        assert_eq!(&tail[..6], &[0x00, 0x3c, 0x00, 0xc0, 0x00, 0x00]);
        assert_eq!(f32::from_le_bytes(tail[ALIGNMENT..ALIGNMENT + 4].try_into().unwrap()), 7.0);
        // The first tensor's info records GGML type 1 (F16), the second type 0.
        let mut info = Vec::new();
        info.extend_from_slice(&1u64.to_le_bytes());
        info.push(b'h');
        info.extend_from_slice(&1u32.to_le_bytes());
        info.extend_from_slice(&3u64.to_le_bytes());
        info.extend_from_slice(&1u32.to_le_bytes());
        assert!(bytes.windows(info.len()).any(|window| window == info.as_slice()));
        assert!(writer.add_tensor_data("bad", &[2], TensorData::F16(vec![0])).is_err());
    }
}
