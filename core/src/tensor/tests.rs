use proptest::prelude::*;

use super::*;
use crate::shm::AllocatorConfig;

fn allocator() -> SharedMemoryAllocator {
    SharedMemoryAllocator::new(AllocatorConfig::default())
}

#[test]
fn from_vec_keeps_the_callers_buffer() {
    let data: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let address = data.as_ptr();
    let tensor = TensorBuffer::from_vec(data, vec![3, 4], DataType::F32).unwrap();
    assert_eq!(tensor.as_f32_slice().unwrap().as_ptr(), address);
    assert_eq!(tensor.as_f32_slice().unwrap()[5], 5.0);
    assert_eq!(tensor.strides(), &[4, 1]);
    assert_eq!(tensor.byte_len(), 48);
    assert_eq!(tensor.len(), 12);
}

#[test]
fn from_vec_refuses_a_shape_that_does_not_fit_the_data() {
    let error = TensorBuffer::from_vec(vec![0i64; 5], vec![2, 3], DataType::I64).unwrap_err();
    assert!(matches!(
        error,
        TensorError::ShapeMismatch {
            needed: 48,
            size: 40,
            ..
        }
    ));
}

#[test]
fn from_vec_refuses_a_data_type_that_is_not_its_elements() {
    let error = TensorBuffer::from_vec(vec![0i32; 4], vec![4], DataType::F32).unwrap_err();
    assert!(matches!(
        error,
        TensorError::ElementMismatch {
            declared: DataType::F32,
            elements: DataType::I32
        }
    ));
    assert!(error.to_string().contains("i32"), "{error}");
}

#[test]
fn copy_from_bytes_is_aligned_for_views_whatever_the_source_alignment() {
    let values: Vec<u64> = vec![1, u64::MAX, 42];
    let mut bytes = vec![0u8; 1];
    bytes.extend_from_slice(bytemuck::cast_slice(&values));
    // `bytes[1..]` starts one byte past an allocation: never 8-byte aligned.
    let tensor = TensorBuffer::copy_from_bytes(&bytes[1..], vec![3], DataType::U64).unwrap();
    assert_eq!(tensor.as_u64_slice().unwrap(), values.as_slice());
    assert_eq!(tensor.byte_len(), 24);
    let odd = TensorBuffer::copy_from_bytes(&[1, 2, 3], vec![3], DataType::U8).unwrap();
    assert_eq!(odd.as_bytes(), &[1, 2, 3]);
    assert!(matches!(
        TensorBuffer::copy_from_bytes(&bytes[1..], vec![4], DataType::F64),
        Err(TensorError::ShapeMismatch { .. })
    ));
}

#[test]
fn typed_view_of_another_dtype_is_refused() {
    let tensor = TensorBuffer::from_vec(vec![1i32, 2], vec![2], DataType::I32).unwrap();
    assert!(matches!(
        tensor.as_f32_slice(),
        Err(TensorError::DtypeMismatch {
            requested: DataType::F32,
            actual: DataType::I32
        })
    ));
    assert_eq!(tensor.as_i32_slice().unwrap(), &[1, 2]);
}

#[test]
fn half_precision_views_read_the_same_bits() {
    let values = vec![f16::from_f32(1.5), f16::from_f32(-2.0)];
    let tensor = TensorBuffer::from_vec(values.clone(), vec![2], DataType::F16).unwrap();
    assert_eq!(tensor.as_f16_slice().unwrap(), values.as_slice());
    let tensor = TensorBuffer::from_vec(vec![bf16::from_f32(3.0)], vec![], DataType::BF16).unwrap();
    assert_eq!(tensor.as_bf16_slice().unwrap()[0].to_f32(), 3.0);
}

#[test]
fn mutable_typed_view_writes_the_bytes() {
    let mut tensor = TensorBuffer::from_vec(vec![0i16; 4], vec![2, 2], DataType::I16).unwrap();
    tensor.as_mut_slice_of::<i16>().unwrap()[3] = -1;
    assert_eq!(&tensor.as_bytes()[6..], &[0xff, 0xff]);
}

#[test]
fn bool_view_checks_every_byte() {
    let tensor = TensorBuffer::from_bytes(vec![0, 1, 1], vec![3], DataType::Bool).unwrap();
    assert_eq!(tensor.as_bool_slice().unwrap(), &[false, true, true]);
    let tensor = TensorBuffer::from_bytes(vec![0, 1, 2], vec![3], DataType::Bool).unwrap();
    assert!(matches!(
        tensor.as_bool_slice(),
        Err(TensorError::InvalidBool { index: 2, value: 2 })
    ));
}

#[test]
fn heap_tensor_has_no_region_id_and_says_so() {
    let tensor = TensorBuffer::from_vec(vec![0u8; 4], vec![4], DataType::U8).unwrap();
    let error = tensor.storage().region_id().unwrap_err();
    assert!(matches!(error, TensorError::NotShared));
    assert!(error.to_string().contains("heap"), "{error}");
    assert!(!tensor.storage().is_shared());
}

#[test]
fn reshape_reinterprets_without_copying_and_checks_the_size() {
    let tensor = TensorBuffer::from_vec(vec![0u8; 16], vec![16], DataType::U8).unwrap();
    let address = tensor.as_bytes().as_ptr();
    let tensor = tensor.reshape(vec![2, 2], DataType::F32).unwrap();
    assert_eq!(tensor.as_bytes().as_ptr(), address);
    assert!(matches!(
        tensor.reshape(vec![3], DataType::F32),
        Err(TensorError::ShapeMismatch {
            needed: 12,
            size: 16,
            ..
        })
    ));
}

#[test]
fn quickstart_round_trip_in_one_process() {
    let allocator = allocator();
    let data: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut tensor = allocator
        .allocate_tensor(1024 * 1024, Some("session-123"))
        .unwrap();
    tensor.as_mut_slice().copy_from_slice(&data);
    let region_id = tensor.storage().region_id().unwrap();
    let shared = TensorBuffer::from_shared_memory(
        &region_id,
        0,
        1024 * 1024,
        vec![256, 1024],
        DataType::F32,
    )
    .unwrap();
    assert_eq!(shared.as_bytes(), data.as_slice());
    assert!(shared.as_f32_slice().is_ok());
    assert_eq!(shared.storage().region_id().unwrap(), region_id);
}

#[test]
fn a_write_through_one_mapping_is_seen_through_the_other() {
    let allocator = allocator();
    let mut owner = allocator.allocate_tensor(8192, None).unwrap();
    let id = owner.storage().region_id().unwrap();
    let mut reader =
        TensorBuffer::from_shared_memory(&id, 4096, 4096, vec![4096], DataType::U8).unwrap();
    assert_ne!(
        owner.as_bytes().as_ptr(),
        reader.as_bytes().as_ptr(),
        "two mappings"
    );
    owner.as_mut_slice()[4096] = 42;
    assert_eq!(reader.as_bytes()[0], 42);
    reader.as_mut_slice()[1] = 43;
    assert_eq!(owner.as_bytes()[4097], 43);
    assert_eq!(reader.storage().offset(), 4096);
}

#[test]
fn shared_memory_slice_must_match_shape_and_fit_the_region() {
    let allocator = allocator();
    let tensor = allocator.allocate_tensor(4096, None).unwrap();
    let id = tensor.storage().region_id().unwrap();
    let error =
        TensorBuffer::from_shared_memory(&id, 0, 4096, vec![1000], DataType::F32).unwrap_err();
    assert!(
        matches!(
            error,
            TensorError::ShapeMismatch {
                needed: 4000,
                size: 4096,
                ..
            }
        ),
        "{error}"
    );
    let error =
        TensorBuffer::from_shared_memory(&id, 8, 4096, vec![1024], DataType::F32).unwrap_err();
    assert!(
        matches!(
            error,
            TensorError::SliceOutOfRange {
                offset: 8,
                size: 4096,
                region_len: 4096
            }
        ),
        "{error}"
    );
    let error =
        TensorBuffer::from_shared_memory(&id, usize::MAX, 4, vec![1], DataType::F32).unwrap_err();
    assert!(
        matches!(error, TensorError::SliceOutOfRange { .. }),
        "{error}"
    );
    let error = TensorBuffer::from_shared_memory(
        "remotemedia-1-ffffffffffffffff",
        0,
        4,
        vec![1],
        DataType::F32,
    )
    .unwrap_err();
    assert!(
        matches!(error, TensorError::Shm(ShmError::NotFound { .. })),
        "{error}"
    );
}

#[test]
fn unaligned_shared_memory_view_is_refused_not_read() {
    let allocator = allocator();
    let tensor = allocator.allocate_tensor(4096, None).unwrap();
    let id = tensor.storage().region_id().unwrap();
    let odd = TensorBuffer::from_shared_memory(&id, 2, 8, vec![2], DataType::F32).unwrap();
    assert!(matches!(
        odd.as_f32_slice(),
        Err(TensorError::Misaligned { align: 4, .. })
    ));
    assert_eq!(odd.as_bytes().len(), 8);
    let even = TensorBuffer::from_shared_memory(&id, 4, 8, vec![2], DataType::F32).unwrap();
    assert_eq!(even.as_f32_slice().unwrap(), &[0.0, 0.0]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn shared_memory_slices_are_accepted_exactly_when_inside_the_region(
        offset in 0usize..20_000,
        size in 0usize..20_000,
    ) {
        let region = crate::shm::Region::create_named(std::num::NonZeroUsize::new(16384).unwrap()).unwrap();
        let result = TensorBuffer::from_shared_memory(region.id(), offset, size, vec![size], DataType::U8);
        if offset + size <= 16384 {
            prop_assert_eq!(result.unwrap().as_bytes().len(), size);
        } else {
            let out_of_range = matches!(result, Err(TensorError::SliceOutOfRange { .. }));
            prop_assert!(out_of_range);
        }
    }
}

#[test]
fn tensors_and_allocators_move_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TensorBuffer>();
    assert_send_sync::<SharedMemoryAllocator>();
    assert_send_sync::<crate::shm::Region>();
}
