//! A streaming attach, whatever protocol carries it: joins the running container's stdio
//! that berth-monitor holds (see `proto/monitor.md`, `attach`). Output arrives as the
//! monitor logs it; input goes to the container's stdin, which is closed when the client
//! ends its stdin and the container says `stdin_once`. It ends when the container's output
//! does.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::StreamError;
use super::exec::ProcessIo;
use crate::container::manager::ContainerManager;
use crate::cri::v1 as cri;
use crate::monitor::attach as frames;

/// Attaches `io` to the container of `req` until its output ends (`Ok(0)`) or `gone`.
pub async fn run(
    containers: &ContainerManager,
    req: &cri::AttachRequest,
    io: ProcessIo,
    gone: impl Future<Output = ()>,
) -> Result<i32, StreamError> {
    let (rec, stream) = containers.attach_stream(&req.container_id).await?;
    tracing::debug!(container = %rec.id, "attached");
    let stdin_once = rec.config.stdin_once;
    let tty = rec.config.tty;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let ProcessIo {
        stdin,
        stdout,
        stderr,
        resize,
    } = io;
    // One writer for the frames of both input pumps.
    let (frame_tx, mut frame_rx) = mpsc::channel::<Vec<u8>>(16);
    let writer = tokio::spawn(async move {
        while let Some(f) = frame_rx.recv().await {
            if wr.write_all(&f).await.is_err() {
                break;
            }
        }
    });
    let mut pumps = Vec::new();
    let close_on_eof = stdin_once && !tty;
    let (detach_tx, detach_rx) = tokio::sync::oneshot::channel::<()>();
    if let Some(mut rx) = stdin {
        let tx = frame_tx.clone();
        pumps.push(tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                let mut f = Vec::with_capacity(data.len() + 5);
                frames::push_frame(&mut f, frames::IN_STDIN, &data);
                if tx.send(f).await.is_err() {
                    return;
                }
            }
            if close_on_eof {
                let mut f = Vec::new();
                frames::push_frame(&mut f, frames::IN_CLOSE_STDIN, &[]);
                let _ = tx.send(f).await;
            } else {
                let _ = detach_tx.send(());
            }
        }));
    }
    if let Some(mut rx) = resize {
        let tx = frame_tx.clone();
        pumps.push(tokio::spawn(async move {
            while let Some(size) = rx.recv().await {
                let mut payload = size.width.to_be_bytes().to_vec();
                payload.extend_from_slice(&size.height.to_be_bytes());
                let mut f = Vec::new();
                frames::push_frame(&mut f, frames::IN_RESIZE, &payload);
                if tx.send(f).await.is_err() {
                    return;
                }
            }
        }));
    }
    drop(frame_tx);
    let output = async {
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            while let Ok(Some((kind, data))) = frames::take_frame(&mut buf) {
                let sink = match kind {
                    frames::OUT_STDOUT => stdout.as_ref(),
                    frames::OUT_STDERR if tty => stdout.as_ref(),
                    frames::OUT_STDERR => stderr.as_ref(),
                    frames::OUT_END => return Ok(()),
                    _ => None,
                };
                if let Some(tx) = sink {
                    let _ = tx.send(data).await;
                }
            }
            match rd.read(&mut chunk).await {
                Ok(0) => return Ok(()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(source) => {
                    return Err(StreamError::Io {
                        context: "read the container's output from its monitor",
                        source,
                    });
                }
            }
        }
    };
    let detached = async {
        if detach_rx.await.is_err() {
            // No stdin: only the container's end or the client's ends the attach.
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        r = output => r.map(|()| 0),
        () = detached => Ok(0),
        () = gone => Err(StreamError::ClientGone),
    };
    for p in pumps {
        p.abort();
    }
    // Input already queued (the last stdin bytes before a detach) still reaches the monitor.
    let stop_writer = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(1), writer)
        .await
        .is_err()
    {
        stop_writer.abort();
    }
    result
}
