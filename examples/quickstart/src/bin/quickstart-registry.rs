//! The API users write, from issue 7, as a program outside the crate: two pipeline stages ask for
//! the same model and share one instance, loaded once. `tests/quickstart.rs` runs it; its asserts
//! are what it checks.
//!
//! `InferenceModel`, the seed's model trait, is declared with the tensor types as an extension of
//! `RegistryModel`, so the model below implements both.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[rustfmt::skip]
use remotemedia_runtime_core::model_registry::{ModelRegistry, RegistryConfig, EvictionPolicy, InferenceModel};
use remotemedia_runtime_core::model_registry::{InferenceError, RegistryModel};
use remotemedia_runtime_core::tensor::{DataType, TensorBuffer};

/// Counts loads from outside the registry.
static LOADS: AtomicUsize = AtomicUsize::new(0);

/// The smallest speech model the snippet needs: loading "reads" the weights, inference returns
/// one value per input frame of 160 samples.
struct WhisperModel {
    weights: Vec<f32>,
}

impl WhisperModel {
    fn load(path: &str) -> Result<Self, std::io::Error> {
        LOADS.fetch_add(1, Ordering::SeqCst);
        Ok(Self {
            weights: vec![0.5; path.len()],
        })
    }
}

impl InferenceModel for WhisperModel {
    fn model_id(&self) -> &str {
        "whisper-base"
    }

    fn device(&self) -> &str {
        "cpu"
    }

    async fn infer(&self, input: &TensorBuffer) -> Result<TensorBuffer, InferenceError> {
        let frames: Vec<f32> = input
            .as_f32_slice()?
            .chunks(160)
            .map(|frame| frame.iter().sum::<f32>() * self.weights[0])
            .collect();
        let len = frames.len();
        Ok(TensorBuffer::from_vec(frames, vec![len], DataType::F32)?)
    }
}

impl RegistryModel for WhisperModel {
    fn memory_usage(&self) -> Option<u64> {
        Some((self.weights.len() * size_of::<f32>()) as u64)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let input_tensor = TensorBuffer::from_vec(vec![1.0_f32; 16_000], vec![16_000], DataType::F32)?;
    let (registry, output) = issue_snippet(input_tensor).await?;

    assert_eq!(LOADS.load(Ordering::SeqCst), 1, "loaded once");
    assert_eq!(output.shape(), &[100]);
    assert!(output.as_f32_slice()?.iter().all(|&v| v == 80.0));
    let m = registry.metrics();
    assert_eq!((m.cache_hits, m.cache_misses, m.total_models), (1, 1, 1));
    let weights_bytes = "models/whisper-base.pt".len() * size_of::<f32>();
    assert_eq!(m.total_memory_bytes, weights_bytes as u64);
    assert_eq!(registry.config().eviction_policy, EvictionPolicy::Ttl);
    println!("ok: one load, one instance shared by two handles");
    Ok(())
}

/// The issue's snippet, verbatim (kept out of rustfmt's way); the comments in the listing loop
/// and after `metrics()` are filled in with the fields they name.
#[rustfmt::skip]
async fn issue_snippet(input_tensor: TensorBuffer) -> Result<(Arc<ModelRegistry>, TensorBuffer), Box<dyn std::error::Error>> {
    let registry = Arc::new(ModelRegistry::new(RegistryConfig::default()));
    let h1 = registry.get_or_load("whisper-base", || WhisperModel::load("models/whisper-base.pt")).await?;
    let h2 = registry.get_or_load("whisper-base", || WhisperModel::load("models/whisper-base.pt")).await?;
    assert!(Arc::ptr_eq(&h1.inner, &h2.inner));
    let output = h1.model().infer(&input_tensor).await?;
    let m = registry.metrics();          // hit_rate, total_memory_bytes, total_models, cache_hits, cache_misses, evictions
    println!(
        "hit rate {:.2}, {} bytes in {} models, {} hits, {} misses, {} evictions",
        m.hit_rate, m.total_memory_bytes, m.total_models, m.cache_hits, m.cache_misses, m.evictions
    );
    for info in registry.list_models() { /* model_id, memory_bytes, reference_count, loaded_at, last_accessed */
        println!(
            "{}: {} bytes, {} references, loaded at {:?}, last accessed {:?}",
            info.model_id, info.memory_bytes, info.reference_count, info.loaded_at, info.last_accessed
        );
        assert_eq!(info.reference_count, 2, "h1 and h2");
    }
    Ok((registry, output))
}
