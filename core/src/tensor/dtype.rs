//! Element types of a tensor.

use std::fmt;

pub use half::{bf16, f16};

/// The element type of a tensor. Names follow Triton's datatype strings (`FP32`, `INT64`, …)
/// where a wire format needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    F32,
    F16,
    BF16,
    I8,
    I16,
    I32,
    I64,
    U8,
    /// One byte per element, 0 or 1.
    Bool,
}

impl DataType {
    /// Every data type, for tests and tables.
    pub const ALL: [DataType; 9] = [
        DataType::F32,
        DataType::F16,
        DataType::BF16,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::U8,
        DataType::Bool,
    ];

    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DataType::I8 | DataType::U8 | DataType::Bool => 1,
            DataType::F16 | DataType::BF16 | DataType::I16 => 2,
            DataType::F32 | DataType::I32 => 4,
            DataType::I64 => 8,
        }
    }

    /// Triton's (KServe v2's) name of the type.
    pub const fn triton_name(self) -> &'static str {
        match self {
            DataType::F32 => "FP32",
            DataType::F16 => "FP16",
            DataType::BF16 => "BF16",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::U8 => "UINT8",
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
            DataType::F32 => "f32",
            DataType::F16 => "f16",
            DataType::BF16 => "bf16",
            DataType::I8 => "i8",
            DataType::I16 => "i16",
            DataType::I32 => "i32",
            DataType::I64 => "i64",
            DataType::U8 => "u8",
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

element!(f32 => F32, f16 => F16, bf16 => BF16, i8 => I8, i16 => I16, i32 => I32, i64 => I64, u8 => U8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triton_names_round_trip() {
        for dtype in DataType::ALL {
            assert_eq!(DataType::from_triton_name(dtype.triton_name()), Some(dtype));
        }
        assert_eq!(DataType::from_triton_name("BYTES"), None);
    }

    #[test]
    fn element_sizes_match_their_rust_types() {
        fn size_of<T: Element>() -> (DataType, usize) {
            (T::DTYPE, std::mem::size_of::<T>())
        }
        for (dtype, size) in [
            size_of::<f32>(),
            size_of::<f16>(),
            size_of::<bf16>(),
            size_of::<i8>(),
            size_of::<i16>(),
            size_of::<i32>(),
            size_of::<i64>(),
            size_of::<u8>(),
        ] {
            assert_eq!(dtype.size_bytes(), size, "{dtype}");
        }
        assert_eq!(DataType::Bool.size_bytes(), std::mem::size_of::<bool>());
    }
}
