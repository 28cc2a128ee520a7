//! Latency of a cached `ModelRegistry::get_or_load` (the model is loaded; the call finds it and
//! hands out a counted handle), single-thread and with 8 threads asking for the same model at
//! once. The baseline, measured in the same run, is the least a cache can do: a mutex-guarded
//! `HashMap` lookup and an `Arc` clone. Each call is timed on its own, so every figure includes
//! the timer's own cost (its row).
//!
//! `cargo bench -p remotemedia-runtime-core --bench registry [-- --quick]`; `--quick` runs one
//! short pass per row.

use std::any::Any;
use std::collections::HashMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use remotemedia_runtime_core::model_registry::{ModelRegistry, RegistryConfig, RegistryModel};

const MODEL_ID: &str = "whisper-base";
const THREADS: usize = 8;

struct Model;

impl RegistryModel for Model {}

/// What one row measures: a fresh call per sample, on its own thread's runtime.
#[derive(Clone)]
enum Subject {
    Timer,
    Baseline(Arc<Mutex<HashMap<String, Arc<dyn Any + Send + Sync>>>>),
    Registry(Arc<ModelRegistry>),
}

impl Subject {
    /// Times `calls` calls, one sample each.
    fn sample(&self, runtime: &tokio::runtime::Runtime, calls: usize) -> Vec<Duration> {
        let mut samples = Vec::with_capacity(calls);
        runtime.block_on(async {
            for _ in 0..calls {
                let start = Instant::now();
                match self {
                    Subject::Timer => {}
                    Subject::Baseline(cache) => {
                        let model = cache.lock().unwrap().get(MODEL_ID).cloned();
                        black_box(model.and_then(|m| m.downcast::<Model>().ok()));
                    }
                    Subject::Registry(registry) => {
                        let handle = registry
                            .get_or_load(MODEL_ID, || Ok::<_, Infallible>(Model))
                            .await;
                        black_box(&handle);
                        // Dropped after the clock stops: the row is the lookup alone.
                        let elapsed = start.elapsed();
                        drop(handle);
                        samples.push(elapsed);
                        continue;
                    }
                }
                samples.push(start.elapsed());
            }
        });
        samples
    }

    /// p50 and p99 over `threads` threads making `calls` calls each, all started together.
    fn run(&self, threads: usize, calls: usize) -> (Duration, Duration) {
        let start = Arc::new(Barrier::new(threads));
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (subject, start) = (self.clone(), Arc::clone(&start));
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("failed to build a tokio runtime");
                    // One untimed round to warm caches.
                    subject.sample(&runtime, calls / 10);
                    start.wait();
                    subject.sample(&runtime, calls)
                })
            })
            .collect();
        let mut samples: Vec<Duration> = workers
            .into_iter()
            .flat_map(|worker| worker.join().expect("benchmark thread panicked"))
            .collect();
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
        (at(0.50), at(0.99))
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

fn main() {
    // `cargo bench` also passes `--bench`; only `--quick` matters here.
    let quick = std::env::args().any(|arg| arg == "--quick");
    let (passes, calls) = if quick { (1, 20_000) } else { (5, 200_000) };

    let registry = Arc::new(ModelRegistry::new(RegistryConfig::default()));
    let runtime = tokio::runtime::Runtime::new().expect("failed to build a tokio runtime");
    runtime
        .block_on(registry.get_or_load(MODEL_ID, || Ok::<_, Infallible>(Model)))
        .expect("failed to load the benchmark model");
    let model: Arc<dyn Any + Send + Sync> = Arc::new(Model);
    let baseline = Arc::new(Mutex::new(HashMap::from([(MODEL_ID.to_owned(), model)])));

    let rows = [
        ("timer alone", 1, Subject::Timer),
        (
            "baseline: Mutex<HashMap> + Arc",
            1,
            Subject::Baseline(baseline.clone()),
        ),
        (
            "get_or_load, cached",
            1,
            Subject::Registry(registry.clone()),
        ),
        (
            "baseline: Mutex<HashMap> + Arc",
            THREADS,
            Subject::Baseline(baseline),
        ),
        (
            "get_or_load, cached",
            THREADS,
            Subject::Registry(registry.clone()),
        ),
    ];
    println!(
        "cached get_or_load latency ({passes} pass(es) of {calls} calls per thread; median pass)"
    );
    println!(
        "{:<32} {:>7} {:>10} {:>10} {:>12}",
        "row", "threads", "p50 ns", "p99 ns", "p50/baseline"
    );
    let mut baseline_p50 = None;
    for (name, threads, subject) in rows {
        let (p50s, p99s): (Vec<_>, Vec<_>) =
            (0..passes).map(|_| subject.run(threads, calls)).unzip();
        let (p50, p99) = (median(p50s), median(p99s));
        let ratio = match subject {
            Subject::Timer => String::from("-"),
            Subject::Baseline(_) => {
                baseline_p50 = Some(p50);
                String::from("1.00")
            }
            Subject::Registry(_) => baseline_p50.map_or_else(
                || String::from("-"),
                |base| {
                    format!(
                        "{:.2}",
                        p50.as_nanos() as f64 / base.as_nanos().max(1) as f64
                    )
                },
            ),
        };
        println!(
            "{name:<32} {threads:>7} {:>10} {:>10} {ratio:>12}",
            p50.as_nanos(),
            p99.as_nanos()
        );
    }
    let m = registry.metrics();
    assert_eq!(m.loads, 1, "a cached benchmark must not reload");
    println!(
        "registry: {} loads, {} hits, hit rate {:.4}",
        m.loads, m.cache_hits, m.hit_rate
    );
}
