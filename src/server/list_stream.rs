//! The `Stream*` list RPCs of KEP-5825 (`StreamPodSandboxes`, `StreamContainers`,
//! `StreamImages`, …): the same items as the unary `List*` answer, sent as a stream of
//! batches so that no message comes near the 16 MiB gRPC limit however full the node is.

use prost::Message;
use tonic::Status;
use tonic::codegen::BoxStream;

/// The most encoded bytes of items in one streamed message (well under any client's limit;
/// containerd and CRI-O use 4 MiB as their default receive limit, 16 MiB for the kubelet).
pub const BATCH_BYTES: usize = 1 << 20;

/// Splits `items` into batches of at most [`BATCH_BYTES`] encoded bytes each (an item larger
/// than that goes alone). An empty list gives no batch: the stream just ends.
pub fn batches<T: Message>(items: Vec<T>, max_bytes: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut size = 0;
    for item in items {
        // The item's length prefix and tag within the repeated field.
        let len = item.encoded_len() + 8;
        if !batch.is_empty() && size + len > max_bytes {
            out.push(std::mem::take(&mut batch));
            size = 0;
        }
        size += len;
        batch.push(item);
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

/// A stream of responses, one per batch of `items`.
pub fn stream<T, R>(items: Vec<T>, wrap: fn(Vec<T>) -> R) -> BoxStream<R>
where
    T: Message + Send + 'static,
    R: Send + 'static,
{
    let responses: Vec<Result<R, Status>> = batches(items, BATCH_BYTES)
        .into_iter()
        .map(|b| Ok(wrap(b)))
        .collect();
    Box::pin(futures_util::stream::iter(responses))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::v1 as cri;

    fn container(n: usize, label_bytes: usize) -> cri::Container {
        cri::Container {
            id: format!("{n:064}"),
            labels: [("l".to_string(), "x".repeat(label_bytes))].into(),
            ..Default::default()
        }
    }

    #[test]
    fn batches_keep_every_item_in_order_and_under_the_budget() {
        let items: Vec<_> = (0..1000).map(|n| container(n, 1000)).collect();
        let out = batches(items.clone(), 64 << 10);
        assert!(out.len() > 1);
        for b in &out {
            let resp = cri::StreamContainersResponse {
                containers: b.clone(),
            };
            assert!(resp.encoded_len() <= 64 << 10, "{}", resp.encoded_len());
        }
        let flat: Vec<_> = out.into_iter().flatten().collect();
        assert_eq!(flat, items);
    }

    #[test]
    fn no_items_no_batch_and_a_huge_item_goes_alone() {
        assert!(batches(Vec::<cri::Container>::new(), 1024).is_empty());
        let out = batches(
            vec![container(1, 10), container(2, 5000), container(3, 10)],
            1024,
        );
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1, 1]);
    }
}
