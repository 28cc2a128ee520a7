//! Element types of a tensor.

use std::fmt;

pub use half::{bf16, f16};

/// The element type of a tensor. Names follow Triton's datatype strings (`FP32`, `INT64`, …)
/// where a wire format needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    F64,
    F32,
    F16,
    BF16,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    /// One byte per element, 0 or 1.
    Bool,
}

impl DataType {
    /// Every data type, for tests and tables: Triton's datatypes but `BYTES` (variable-length
    /// strings, not a fixed-size element).
    pub const ALL: [DataType; 13] = [
        DataType::F64,
        DataType::F32,
        DataType::F16,
        DataType::BF16,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::Bool,
    ];

    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DataType::I8 | DataType::U8 | DataType::Bool => 1,
            DataType::F16 | DataType::BF16 | DataType::I16 | DataType::U16 => 2,
            DataType::F32 | DataType::I32 | DataType::U32 => 4,
            DataType::F64 | DataType::I64 | DataType::U64 => 8,
        }
    }

    /// Triton's (KServe v2's) name of the type.
    pub const fn triton_name(self) -> &'static str {
        match self {
            DataType::F64 => "FP64",
            DataType::F32 => "FP32",
            DataType::F16 => "FP16",
            DataType::BF16 => "BF16",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::Bool => "BOOL",
        }
    }

    /// The type Triton calls `name`, if we support it.
    pub fn from_triton_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|dtype| dtype.triton_name() == name)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataType::F64 => "f64",
            DataType::F32 => "f32",
            DataType::F16 => "f16",
            DataType::BF16 => "bf16",
            DataType::I8 => "i8",
            DataType::I16 => "i16",
            DataType::I32 => "i32",
            DataType::I64 => "i64",
            DataType::U8 => "u8",
            DataType::U16 => "u16",
            DataType::U32 => "u32",
            DataType::U64 => "u64",
            DataType::Bool => "bool",
        })
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type whose values are a tensor's elements: every bit pattern valid, so a view of
/// shared bytes can never hold an invalid value. `bool` is not one (see
/// `TensorBuffer::as_bool_slice`, which checks every byte).
pub trait Element: bytemuck::Pod + Send + Sync + fmt::Debug + sealed::Sealed {
    /// The tensor data type these elements are.
    const DTYPE: DataType;
}

macro_rules! element {
    ($($ty:ty => $dtype:ident),* $(,)?) => {$(
        impl sealed::Sealed for $ty {}
        impl Element for $ty {
            const DTYPE: DataType = DataType::$dtype;
        }
    )*};
}

element!(
    f64 => F64, f32 => F32, f16 => F16, bf16 => BF16, i8 => I8, i16 => I16, i32 => I32,
    i64 => I64, u8 => U8, u16 => U16, u32 => U32, u64 => U64,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triton_names_round_trip() {
        for dtype in DataType::ALL {
            assert_eq!(DataType::from_triton_name(dtype.triton_name()), Some(dtype));
        }
        assert_eq!(DataType::from_triton_name("BYTES"), None);
        assert_eq!(DataType::from_triton_name("fp32"), None);
    }

    #[test]
    fn every_triton_datatype_but_bytes_is_known() {
        let triton = [
            "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
            "FP16", "FP32", "FP64", "BF16",
        ];
        for name in triton {
            let dtype = DataType::from_triton_name(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(dtype.triton_name(), name);
        }
        assert_eq!(DataType::ALL.len(), triton.len());
    }

    #[test]
    fn element_sizes_match_their_rust_types() {
        fn size_of<T: Element>() -> (DataType, usize) {
            (T::DTYPE, std::mem::size_of::<T>())
        }
        for (dtype, size) in [
            size_of::<f64>(),
            size_of::<f32>(),
            size_of::<f16>(),
            size_of::<bf16>(),
            size_of::<i8>(),
            size_of::<i16>(),
            size_of::<i32>(),
            size_of::<i64>(),
            size_of::<u8>(),
            size_of::<u16>(),
            size_of::<u32>(),
            size_of::<u64>(),
        ] {
            assert_eq!(dtype.size_bytes(), size, "{dtype}");
        }
        assert_eq!(DataType::Bool.size_bytes(), std::mem::size_of::<bool>());
    }
}
