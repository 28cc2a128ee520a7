//! Many concurrent clients: every answer correct, none lost.

use crate::support::{Worker, request};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_each_get_their_own_answers() {
    const CLIENTS: usize = 128;
    const REQUESTS: usize = 50;
    let worker = Worker::start("builtin://identity", &[]).await;
    let mut tasks = Vec::with_capacity(CLIENTS);
    for client_index in 0..CLIENTS {
        // One connection per client, as separate processes would have.
        let mut client = worker.client().await;
        tasks.push(tokio::spawn(async move {
            for request_index in 0..REQUESTS {
                let payload: Vec<u8> =
                    format!("client {client_index} request {request_index}").into_bytes();
                let mut message = request(
                    "identity",
                    "UINT8",
                    &[payload.len() as i64],
                    payload.clone(),
                );
                message.id = format!("{client_index}/{request_index}");
                let response = client.model_infer(message).await.unwrap().into_inner();
                assert_eq!(response.id, format!("{client_index}/{request_index}"));
                assert_eq!(response.raw_output_contents[0].as_ref(), payload.as_slice());
            }
            REQUESTS
        }));
    }
    let mut answered = 0;
    for task in tasks {
        answered += task.await.unwrap();
    }
    assert_eq!(answered, CLIENTS * REQUESTS);
    let served = worker
        .metric("remotemedia_worker_requests_total{outcome=\"success\"}")
        .await;
    assert_eq!(served, (CLIENTS * REQUESTS) as f64);
}
