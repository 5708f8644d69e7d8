//! The attach stream between berthd and berth-monitor. After `{"op":"attach","id":…}` is
//! answered `{"result":"ok"}`, the connection carries frames instead of JSON lines:
//! `[kind: u8][length: u32 big-endian][payload]`.
//!
//! monitor → berthd: [`OUT_STDOUT`], [`OUT_STDERR`] (the container's output, as logged), and
//! [`OUT_END`] once the container's output has ended (then the monitor closes).
//! berthd → monitor: [`IN_STDIN`] (bytes for the container's stdin), [`IN_CLOSE_STDIN`]
//! (stdin_once: close it), [`IN_RESIZE`] (width and height, u16 big-endian each, for a
//! terminal container).
//!
//! An attacher that reads too slowly loses output beyond [`ATTACH_BUFFER`]: the container and
//! its log never wait for it.

pub const OUT_STDOUT: u8 = 1;
pub const OUT_STDERR: u8 = 2;
pub const OUT_END: u8 = 3;
pub const IN_STDIN: u8 = 0;
pub const IN_CLOSE_STDIN: u8 = 1;
pub const IN_RESIZE: u8 = 2;

/// Output queued for one attacher beyond which new output is dropped for it.
pub const ATTACH_BUFFER: usize = 1 << 20;
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// Appends one frame to `out`.
pub fn push_frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// A frame announced longer than [`MAX_FRAME`]: the peer is not speaking this protocol.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("attach frame of {0} bytes is too long")]
pub struct FrameTooLong(pub usize);

/// Takes the first whole frame out of `buf`: `Ok(None)` when more bytes are needed.
pub fn take_frame(buf: &mut Vec<u8>) -> Result<Option<(u8, Vec<u8>)>, FrameTooLong> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameTooLong(len));
    }
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let kind = buf[0];
    let payload = buf[5..5 + len].to_vec();
    buf.drain(..5 + len);
    Ok(Some((kind, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_wait_for_whole_ones() {
        let mut b = Vec::new();
        push_frame(&mut b, OUT_STDOUT, b"hello");
        push_frame(&mut b, OUT_END, b"");
        let mut part = b[..7].to_vec();
        assert_eq!(take_frame(&mut part), Ok(None));
        assert_eq!(
            take_frame(&mut b),
            Ok(Some((OUT_STDOUT, b"hello".to_vec())))
        );
        assert_eq!(take_frame(&mut b), Ok(Some((OUT_END, Vec::new()))));
        assert!(b.is_empty());
        let mut huge = vec![IN_STDIN, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(take_frame(&mut huge), Err(FrameTooLong(u32::MAX as usize)));
    }
}
