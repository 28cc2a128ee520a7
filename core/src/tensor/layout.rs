//! Shape, stride and slice arithmetic, checked: every overflow and mismatch is an error.

use super::{DataType, TensorError};

/// Elements in a tensor of `shape` (1 for a scalar, `[]`).
pub fn element_count(shape: &[usize]) -> Result<usize, TensorError> {
    // Any zero dimension empties the tensor, however large the others are.
    if shape.contains(&0) {
        return Ok(0);
    }
    shape
        .iter()
        .try_fold(1usize, |n, &dim| n.checked_mul(dim))
        .ok_or_else(|| TensorError::ShapeOverflow {
            shape: shape.to_vec(),
        })
}

/// Bytes in a tensor of `shape` and `dtype`.
pub fn byte_size(shape: &[usize], dtype: DataType) -> Result<usize, TensorError> {
    element_count(shape)?
        .checked_mul(dtype.size_bytes())
        .ok_or_else(|| TensorError::ShapeOverflow {
            shape: shape.to_vec(),
        })
}

/// C-contiguous (row-major) strides of `shape`, in elements: the last dimension is contiguous.
pub fn contiguous_strides(shape: &[usize]) -> Result<Vec<usize>, TensorError> {
    let mut strides = vec![0; shape.len()];
    let mut stride = 1usize;
    for (slot, &dim) in strides.iter_mut().zip(shape).rev() {
        *slot = stride;
        stride = stride
            .checked_mul(dim)
            .ok_or_else(|| TensorError::ShapeOverflow {
                shape: shape.to_vec(),
            })?;
    }
    Ok(strides)
}

/// Checks that `shape` of `dtype` fills exactly `size` bytes.
pub fn check_size(shape: &[usize], dtype: DataType, size: usize) -> Result<(), TensorError> {
    let needed = byte_size(shape, dtype)?;
    if needed != size {
        return Err(TensorError::ShapeMismatch {
            shape: shape.to_vec(),
            dtype,
            needed,
            size,
        });
    }
    Ok(())
}

/// Checks that `[offset, offset + size)` lies inside a region of `region_len` bytes.
pub fn check_slice(offset: usize, size: usize, region_len: usize) -> Result<(), TensorError> {
    match offset.checked_add(size) {
        Some(end) if end <= region_len => Ok(()),
        _ => Err(TensorError::SliceOutOfRange {
            offset,
            size,
            region_len,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quickstart_shape_is_one_mebibyte_of_f32() {
        assert_eq!(byte_size(&[256, 1024], DataType::F32).unwrap(), 1 << 20);
        assert_eq!(contiguous_strides(&[256, 1024]).unwrap(), vec![1024, 1]);
    }

    #[test]
    fn scalar_has_one_element_and_no_strides() {
        assert_eq!(element_count(&[]).unwrap(), 1);
        assert!(contiguous_strides(&[]).unwrap().is_empty());
    }

    #[test]
    fn overflowing_shape_is_an_error_not_a_wrap() {
        let shape = [usize::MAX, 2];
        assert!(matches!(
            element_count(&shape),
            Err(TensorError::ShapeOverflow { .. })
        ));
        assert!(matches!(
            byte_size(&[usize::MAX / 2 + 1], DataType::I16),
            Err(TensorError::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn size_mismatch_names_shape_dtype_and_both_sizes() {
        let message = check_size(&[2, 3], DataType::F32, 20)
            .unwrap_err()
            .to_string();
        assert!(message.contains("[2, 3]"), "{message}");
        assert!(message.contains("f32"), "{message}");
        assert!(message.contains("24"), "{message}");
        assert!(message.contains("20"), "{message}");
    }

    #[test]
    fn out_of_range_slice_names_offset_size_and_region_length() {
        let message = check_slice(4096, 1 << 20, 1 << 20).unwrap_err().to_string();
        assert!(message.contains("4096"), "{message}");
        assert!(message.contains("1048576"), "{message}");
    }

    fn any_dtype() -> impl Strategy<Value = DataType> {
        proptest::sample::select(DataType::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn strides_step_over_exactly_the_inner_dimensions(shape in proptest::collection::vec(0usize..16, 0..6)) {
            let strides = contiguous_strides(&shape).unwrap();
            for i in 0..shape.len() {
                let inner: usize = shape[i + 1..].iter().product();
                prop_assert_eq!(strides[i], inner);
            }
        }

        #[test]
        fn byte_size_is_elements_times_dtype_size(shape in proptest::collection::vec(0usize..64, 0..5), dtype in any_dtype()) {
            let elements: usize = shape.iter().product();
            prop_assert_eq!(byte_size(&shape, dtype).unwrap(), elements * dtype.size_bytes());
            prop_assert!(check_size(&shape, dtype, elements * dtype.size_bytes()).is_ok());
            prop_assert!(check_size(&shape, dtype, elements * dtype.size_bytes() + 1).is_err());
        }

        #[test]
        fn slice_check_accepts_exactly_the_slices_inside_the_region(offset in any::<usize>(), size in any::<usize>(), region_len in any::<usize>()) {
            let inside = (offset as u128) + (size as u128) <= region_len as u128;
            prop_assert_eq!(check_slice(offset, size, region_len).is_ok(), inside);
        }

        #[test]
        fn huge_shapes_never_panic(shape in proptest::collection::vec(any::<usize>(), 0..4), dtype in any_dtype()) {
            let exact = shape.iter().try_fold(1u128, |n, &d| n.checked_mul(d as u128))
                .and_then(|n| n.checked_mul(dtype.size_bytes() as u128))
                .filter(|&n| n <= usize::MAX as u128);
            match byte_size(&shape, dtype) {
                Ok(bytes) => prop_assert_eq!(Some(bytes as u128), exact),
                Err(_) => prop_assert_eq!(exact, None),
            }
            let _ = contiguous_strides(&shape);
        }
    }
}
