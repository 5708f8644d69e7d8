//! Accepts any HTTP/2 `:authority` from CRI clients, as Go's gRPC server does.
//!
//! gRPC clients that dial a unix socket often send the socket path as `:authority`
//! (grpc-java, Python gRPC >= 1.57, `grpcurl -unix`, grpc-go dialling a bare path). The
//! `h2` server under hyper rejects every request whose `:authority` does not parse as an
//! [`http::uri::Authority`] with `RST_STREAM PROTOCOL_ERROR` (hyperium/h2#487), and offers
//! no option to relax that. berth's RPCs never look at the authority, so
//! [`AuthorityFix`] sits between the accepted socket and hyper and rewrites the request
//! headers on the way in:
//!
//! * the client preface and every frame other than HEADERS/CONTINUATION pass through
//!   untouched; in the steady state the bytes are read straight into hyper's buffer and only
//!   the 9-byte frame headers are looked at;
//! * a HEADERS frame and its CONTINUATION frames are collected (padding stripped, priority
//!   kept), the header block is HPACK-decoded with the connection's decoding context
//!   ([`loona_hpack`]), a `:authority` that `http` would reject is replaced by `localhost`,
//!   and the fields are re-encoded as literals without indexing, so h2's decoder never
//!   depends on its dynamic table and both HPACK contexts stay consistent;
//! * the new block is sent as HEADERS + CONTINUATION frames of at most 16384 bytes of
//!   payload (the frame size every HTTP/2 endpoint must accept).
//!
//! Malformed input (bad HPACK, an oversized header block, another frame in the middle of a
//! header block, a bad preface) ends that connection with an [`io::Error`]; the daemon keeps
//! serving. Server-to-client bytes pass through unchanged.

use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use loona_hpack::decoder::DecoderError;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header: 24-bit length, type, flags, 31-bit stream id.
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The most frames one header block may span: a flood of (empty) CONTINUATION frames is
/// refused here, since they never reach h2's own guard against it.
const MAX_BLOCK_FRAMES: usize = 64;
/// Length of the priority fields of a HEADERS frame with the PRIORITY flag.
const PRIORITY_LEN: usize = 5;
/// The largest frame payload written towards hyper: the initial SETTINGS_MAX_FRAME_SIZE,
/// which every endpoint must accept whatever it advertises.
const OUT_MAX_FRAME: usize = 16_384;
/// The largest header block accepted, both as received (compressed, all frames together)
/// and decoded (RFC 7541 §4.1 sizes: name + value + 32 per field).
pub const MAX_HEADER_BLOCK: usize = 1 << 20;
/// The HPACK dynamic table size the server allows: berthd does not set
/// SETTINGS_HEADER_TABLE_SIZE, so it is the protocol default.
const HEADER_TABLE_SIZE: usize = 4096;
/// Buffer room a connection keeps after a large header block has gone through.
const KEEP_CAPACITY: usize = 64 << 10;
/// What replaces an `:authority` that `http::uri::Authority` rejects.
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// Why a client connection was given up.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("the client did not send the HTTP/2 connection preface")]
    Preface,
    #[error("HEADERS frame on stream 0")]
    StreamZero,
    #[error("HEADERS frame of stream {0}: padding or priority longer than the frame")]
    Padding(u32),
    #[error(
        "frame of type {frame_type:#x} on stream {got} inside the header block of stream {stream}"
    )]
    Interleaved {
        frame_type: u8,
        got: u32,
        stream: u32,
    },
    #[error("header block of stream {0} is larger than {MAX_HEADER_BLOCK} bytes")]
    TooLarge(u32),
    #[error("header block of stream {0} spans more than {MAX_BLOCK_FRAMES} frames")]
    TooManyFrames(u32),
    #[error("header block of stream {stream}: {source}")]
    Hpack { stream: u32, source: DecoderError },
    #[error("encoding the header block: {0}")]
    Encode(#[from] io::Error),
}

impl From<AuthorityError> for io::Error {
    fn from(e: AuthorityError) -> io::Error {
        match e {
            AuthorityError::Encode(e) => e,
            e => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    /// Parses the first [`FRAME_HEADER_LEN`] bytes of `b`, if there are that many.
    fn parse(b: &[u8]) -> Option<FrameHeader> {
        let h: &[u8; FRAME_HEADER_LEN] = b.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        Some(FrameHeader {
            len: (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]),
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        let len = (self.len as u32).to_be_bytes();
        out.extend_from_slice(&len[1..]);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&self.stream.to_be_bytes());
    }
}

/// Where the parser is in the client's byte stream.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Inside the connection preface, `matched` bytes of it seen.
    Preface { matched: usize },
    /// At a frame boundary.
    FrameHeader,
    /// Inside the payload of a frame that passes through unchanged.
    Payload { remaining: usize },
}

/// A header block being collected from HEADERS + CONTINUATION frames.
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    fragment: Vec<u8>,
    /// HEADERS and CONTINUATION frames collected so far.
    frames: usize,
}

/// The byte-stream rewriter, without I/O: decides which client bytes pass through and
/// turns header blocks into rewritten frames.
struct Rewriter {
    state: State,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Rewriter {
    /// A rewriter at the start of a client connection (expecting the preface).
    fn new() -> Rewriter {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Rewriter {
            state: State::Preface { matched: 0 },
            block: None,
            decoder,
        }
    }

    /// How many leading bytes of `data` pass through unchanged. Stops at the first frame
    /// that has to be held: a header-block frame, or a frame header cut by the end of
    /// `data`; [`Rewriter::take_held`] continues from there.
    fn pass_through(&mut self, data: &[u8]) -> Result<usize, AuthorityError> {
        let mut i = 0;
        while i < data.len() {
            match &mut self.state {
                State::Preface { matched } => {
                    let n = (PREFACE.len() - *matched).min(data.len() - i);
                    if data[i..i + n] != PREFACE[*matched..*matched + n] {
                        return Err(AuthorityError::Preface);
                    }
                    *matched += n;
                    i += n;
                    if *matched == PREFACE.len() {
                        self.state = State::FrameHeader;
                    }
                }
                State::Payload { remaining } => {
                    let n = (*remaining).min(data.len() - i);
                    *remaining -= n;
                    i += n;
                    if *remaining == 0 {
                        self.state = State::FrameHeader;
                    }
                }
                State::FrameHeader => {
                    if self.block.is_some() {
                        return Ok(i);
                    }
                    let Some(h) = FrameHeader::parse(&data[i..]) else {
                        return Ok(i);
                    };
                    if h.kind == TYPE_HEADERS {
                        return Ok(i);
                    }
                    i += FRAME_HEADER_LEN;
                    self.state = if h.len == 0 {
                        State::FrameHeader
                    } else {
                        State::Payload { remaining: h.len }
                    };
                }
            }
        }
        Ok(i)
    }

    /// Consumes one held frame from the start of `data` (where [`Rewriter::pass_through`]
    /// stopped), appending what hyper should read to `out`. Returns the bytes consumed, 0
    /// when `data` does not hold the whole frame yet.
    fn take_held(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize, AuthorityError> {
        let Some(h) = FrameHeader::parse(data) else {
            return Ok(0);
        };
        match (&self.block, h.kind) {
            (None, TYPE_HEADERS) | (Some(_), TYPE_CONTINUATION) => {
                if h.len > MAX_HEADER_BLOCK {
                    return Err(AuthorityError::TooLarge(h.stream));
                }
                let Some(payload) = data.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len) else {
                    return Ok(0);
                };
                self.header_frame(h, payload, out)?;
                Ok(FRAME_HEADER_LEN + h.len)
            }
            (Some(block), _) => Err(AuthorityError::Interleaved {
                frame_type: h.kind,
                got: h.stream,
                stream: block.stream,
            }),
            (None, _) => {
                // A frame header that was cut by the end of a read: pass it on.
                out.extend_from_slice(&data[..FRAME_HEADER_LEN]);
                self.state = if h.len == 0 {
                    State::FrameHeader
                } else {
                    State::Payload { remaining: h.len }
                };
                Ok(FRAME_HEADER_LEN)
            }
        }
    }

    /// Adds a HEADERS or CONTINUATION frame to the block; at END_HEADERS writes the
    /// rewritten block to `out`.
    fn header_frame(
        &mut self,
        h: FrameHeader,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), AuthorityError> {
        let block = match self.block.as_mut() {
            Some(block) => {
                if h.stream != block.stream {
                    return Err(AuthorityError::Interleaved {
                        frame_type: h.kind,
                        got: h.stream,
                        stream: block.stream,
                    });
                }
                block.frames += 1;
                if block.frames > MAX_BLOCK_FRAMES {
                    return Err(AuthorityError::TooManyFrames(block.stream));
                }
                block.fragment.extend_from_slice(payload);
                block
            }
            None => {
                if h.stream == 0 {
                    return Err(AuthorityError::StreamZero);
                }
                let mut p = payload;
                let mut pad = 0;
                if h.flags & FLAG_PADDED != 0 {
                    let (&n, rest) = p.split_first().ok_or(AuthorityError::Padding(h.stream))?;
                    pad = usize::from(n);
                    p = rest;
                }
                let mut priority = None;
                if h.flags & FLAG_PRIORITY != 0 {
                    let (fields, rest) = p
                        .split_first_chunk::<PRIORITY_LEN>()
                        .ok_or(AuthorityError::Padding(h.stream))?;
                    priority = Some(*fields);
                    p = rest;
                }
                let end = p
                    .len()
                    .checked_sub(pad)
                    .ok_or(AuthorityError::Padding(h.stream))?;
                let fragment = &p[..end];
                self.block.insert(Block {
                    stream: h.stream,
                    end_stream: h.flags & FLAG_END_STREAM != 0,
                    priority,
                    fragment: fragment.to_vec(),
                    frames: 1,
                })
            }
        };
        if block.fragment.len() > MAX_HEADER_BLOCK {
            return Err(AuthorityError::TooLarge(block.stream));
        }
        if h.flags & FLAG_END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.rewrite(block, out)?;
        }
        Ok(())
    }

    /// Decodes a complete header block, fixes `:authority` and writes the block as frames.
    fn rewrite(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        let mut decoded_size = 0usize;
        let mut encode_err = None;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                decoded_size = decoded_size.saturating_add(name.len() + value.len() + 32);
                if decoded_size > MAX_HEADER_BLOCK || encode_err.is_some() {
                    return;
                }
                let value = if &*name == b":authority"
                    && http::uri::Authority::try_from(&*value).is_err()
                {
                    Cow::Borrowed(REPLACEMENT_AUTHORITY)
                } else {
                    value
                };
                if let Err(e) = encode_literal(&name, &value, &mut encoded) {
                    encode_err = Some(e);
                }
            })
            .map_err(|source| AuthorityError::Hpack {
                stream: block.stream,
                source,
            })?;
        if decoded_size > MAX_HEADER_BLOCK {
            return Err(AuthorityError::TooLarge(block.stream));
        }
        if let Some(e) = encode_err {
            return Err(e.into());
        }
        write_header_frames(&block, &encoded, out);
        Ok(())
    }
}

/// One field as a literal without indexing with a literal name (RFC 7541 §6.2.2), strings
/// not Huffman-coded.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    out.push(0x00);
    for s in [name, value] {
        loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out)?;
        out.extend_from_slice(s);
    }
    Ok(())
}

/// Writes `encoded` as one HEADERS frame (with the block's END_STREAM and priority) and as
/// many CONTINUATION frames as needed, each payload at most [`OUT_MAX_FRAME`] bytes.
fn write_header_frames(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    out.reserve(encoded.len() + (encoded.len() / OUT_MAX_FRAME + 1) * FRAME_HEADER_LEN + 8);
    let first_room = OUT_MAX_FRAME - block.priority.map_or(0, |_| PRIORITY_LEN);
    let (first, mut rest) = encoded.split_at(encoded.len().min(first_room));
    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    FrameHeader {
        len: first.len() + block.priority.map_or(0, |_| PRIORITY_LEN),
        kind: TYPE_HEADERS,
        flags,
        stream: block.stream,
    }
    .write(out);
    if let Some(p) = block.priority {
        out.extend_from_slice(&p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(OUT_MAX_FRAME));
        rest = tail;
        FrameHeader {
            len: chunk.len(),
            kind: TYPE_CONTINUATION,
            flags: if rest.is_empty() { FLAG_END_HEADERS } else { 0 },
            stream: block.stream,
        }
        .write(out);
        out.extend_from_slice(chunk);
    }
}

/// An accepted client connection whose incoming request headers are rewritten so that
/// hyper accepts any `:authority` (see the module docs). Writes pass straight through.
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    /// Client bytes not handed on yet: from the first frame that had to be held (an
    /// incomplete frame header or header-block frame) to the end of what was read.
    held: Vec<u8>,
    /// Bytes for hyper that do not come straight from the socket: rewritten header
    /// frames and the bytes that followed them in `held`.
    out: Vec<u8>,
    /// How much of `out` hyper has read.
    out_pos: usize,
}

impl<S> AuthorityFix<S> {
    /// Wraps a freshly accepted connection (nothing read from it yet).
    pub fn new(inner: S) -> AuthorityFix<S> {
        AuthorityFix {
            inner,
            rewriter: Rewriter::new(),
            held: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// Moves as much of `held` as is complete through the rewriter into `out`.
    fn process_held(&mut self) -> Result<(), AuthorityError> {
        let mut pos = 0;
        while pos < self.held.len() {
            let n = self.rewriter.pass_through(&self.held[pos..])?;
            self.out.extend_from_slice(&self.held[pos..pos + n]);
            pos += n;
            if pos == self.held.len() {
                break;
            }
            let n = self.rewriter.take_held(&self.held[pos..], &mut self.out)?;
            if n == 0 {
                break;
            }
            pos += n;
        }
        self.held.drain(..pos);
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                    // A long-lived connection does not keep the room of a rare huge block.
                    this.out.shrink_to(KEEP_CAPACITY);
                    this.held.shrink_to(KEEP_CAPACITY);
                }
                return Poll::Ready(Ok(()));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let start = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let end = buf.filled().len();
            if end == start {
                // End of stream. A frame cut short is the peer's loss; hyper sees the end.
                return Poll::Ready(Ok(()));
            }
            // The fast path: bytes that pass through stay where they were read.
            let keep = if this.held.is_empty() {
                this.rewriter.pass_through(&buf.filled()[start..end])?
            } else {
                0
            };
            if start + keep < end {
                this.held
                    .extend_from_slice(&buf.filled()[start + keep..end]);
                buf.set_filled(start + keep);
                this.process_held()?;
            }
            if keep > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    /// An `AsyncRead` that hands out the given chunks, one per read.
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if let Some(mut chunk) = this.0.pop_front() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    this.0.push_front(chunk.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Feeds `input` through an [`AuthorityFix`] in reads of `chunk` bytes and reads the
    /// result with a buffer of `read_buf` bytes.
    async fn run(input: &[u8], chunk: usize, read_buf: usize) -> io::Result<Vec<u8>> {
        let chunks = input.chunks(chunk).map(<[u8]>::to_vec).collect();
        let mut fix = AuthorityFix::new(Chunks(chunks));
        let mut out = Vec::new();
        let mut buf = vec![0; read_buf];
        loop {
            let n = fix.read(&mut buf).await?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// `run` with several chunkings, checking that they all give the same bytes.
    async fn run_all(input: &[u8]) -> io::Result<Vec<u8>> {
        let whole = run(input, input.len().max(1), 64 << 10).await?;
        for (chunk, read_buf) in [(1, 64 << 10), (7, 5), (13, 1), (4096, 100), (9, 9)] {
            let other = run(input, chunk, read_buf).await?;
            assert_eq!(whole, other, "chunk {chunk}, read buffer {read_buf}");
        }
        Ok(whole)
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        FrameHeader {
            len: payload.len(),
            kind,
            flags,
            stream,
        }
        .write(&mut out);
        out.extend_from_slice(payload);
        out
    }

    fn settings() -> Vec<u8> {
        frame(0x4, 0, 0, &[0, 0x3, 0, 0, 0, 100])
    }

    fn request(authority: &[u8], path: &[u8]) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", path.to_vec()),
            (b":authority", authority.to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
            (b"te", b"trailers".to_vec()),
        ]
    }

    fn encode(enc: &mut loona_hpack::Encoder<'_>, fields: &[(&'static [u8], Vec<u8>)]) -> Vec<u8> {
        enc.encode(fields.iter().map(|(n, v)| (*n, v.as_slice())))
    }

    fn owned(fields: &[(&'static [u8], Vec<u8>)]) -> Fields {
        fields
            .iter()
            .map(|(n, v)| (n.to_vec(), v.clone()))
            .collect()
    }

    /// A frame as written by the rewriter.
    #[derive(Debug, PartialEq)]
    struct Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    /// Splits the rewritten stream into its preface check and frames.
    fn frames(out: &[u8]) -> Vec<Frame> {
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut rest = &out[PREFACE.len()..];
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let h = FrameHeader::parse(rest).expect("a whole frame header");
            assert!(h.len <= OUT_MAX_FRAME || ![TYPE_HEADERS, TYPE_CONTINUATION].contains(&h.kind));
            frames.push(Frame {
                kind: h.kind,
                flags: h.flags,
                stream: h.stream,
                payload: rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len].to_vec(),
            });
            rest = &rest[FRAME_HEADER_LEN + h.len..];
        }
        frames
    }

    /// The header blocks in `frames` (HEADERS + CONTINUATION), each decoded with a fresh
    /// decoder: the rewritten blocks must not depend on any dynamic table.
    fn blocks(frames: &[Frame]) -> Vec<(u32, u8, Fields)> {
        let mut blocks = Vec::new();
        let mut current: Option<(u32, u8, Vec<u8>)> = None;
        for f in frames {
            match f.kind {
                TYPE_HEADERS => {
                    assert!(current.is_none(), "HEADERS inside a block");
                    assert_eq!(f.flags & FLAG_PADDED, 0, "padding is stripped");
                    let skip = if f.flags & FLAG_PRIORITY != 0 { 5 } else { 0 };
                    current = Some((f.stream, f.flags, f.payload[skip..].to_vec()));
                }
                TYPE_CONTINUATION => {
                    let c = current.as_mut().expect("CONTINUATION in a block");
                    assert_eq!(c.0, f.stream);
                    c.2.extend_from_slice(&f.payload);
                }
                _ => {
                    assert!(current.is_none(), "frame inside a header block");
                    continue;
                }
            }
            if f.flags & FLAG_END_HEADERS != 0 {
                let (stream, flags, block) = current.take().expect("block");
                let fields = loona_hpack::Decoder::new()
                    .decode(&block)
                    .expect("rewritten block decodes without a dynamic table");
                blocks.push((stream, flags, fields));
            }
        }
        assert!(current.is_none(), "unfinished block");
        blocks
    }

    fn with_authority(fields: &Fields, authority: &[u8]) -> Fields {
        fields
            .iter()
            .map(|(n, v)| {
                if n == b":authority" {
                    (n.clone(), authority.to_vec())
                } else {
                    (n.clone(), v.clone())
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn socket_path_authority_is_replaced_and_other_fields_kept() {
        let mut enc = loona_hpack::Encoder::new();
        let req = request(
            b"/run/berth/berth.sock",
            b"/runtime.v1.RuntimeService/Version",
        );
        let mut input = PREFACE.to_vec();
        input.extend(settings());
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &encode(&mut enc, &req),
        ));
        let data = frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]);
        input.extend(&data);
        let out = run_all(&input).await.expect("rewrite");
        let frames = frames(&out);
        assert_eq!(frames.len(), 3);
        assert_eq!(
            frames[0],
            Frame {
                kind: 0x4,
                flags: 0,
                stream: 0,
                payload: settings()[9..].to_vec()
            }
        );
        assert_eq!(frames[2].payload, data[9..]);
        assert_eq!(frames[2].flags, FLAG_END_STREAM);
        let blocks = blocks(&frames);
        assert_eq!(
            blocks,
            vec![(
                1,
                FLAG_END_HEADERS,
                with_authority(&owned(&req), b"localhost")
            )]
        );
    }

    #[tokio::test]
    async fn valid_and_invalid_authorities() {
        for (authority, expect) in [
            (&b"localhost"[..], &b"localhost"[..]),
            (b"127.0.0.1:1234", b"127.0.0.1:1234"),
            (b"[::1]:50051", b"[::1]:50051"),
            (b"berth.sock", b"berth.sock"),
            (b"%2Frun%2Fberth%2Fberth.sock", b"localhost"),
            (b"/run/berth/berth.sock", b"localhost"),
            (b"unix:///run/berth.sock", b"localhost"),
            (b"a b", b"localhost"),
            (b"\xff\xfe", b"localhost"),
        ] {
            let req = request(authority, b"/x");
            let mut input = PREFACE.to_vec();
            input.extend(frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                3,
                &encode(&mut loona_hpack::Encoder::new(), &req),
            ));
            let out = run_all(&input).await.expect("rewrite");
            let blocks = blocks(&frames(&out));
            assert_eq!(
                blocks,
                vec![(
                    3,
                    FLAG_END_HEADERS | FLAG_END_STREAM,
                    with_authority(&owned(&req), expect)
                )],
                "{}",
                String::from_utf8_lossy(authority)
            );
        }
    }

    #[tokio::test]
    async fn continuation_frames_are_assembled() {
        let req = request(
            b"/run/berth/berth.sock",
            b"/runtime.v1.RuntimeService/Status",
        );
        let block = encode(&mut loona_hpack::Encoder::new(), &req);
        let (a, rest) = block.split_at(5);
        let (b, c) = rest.split_at(20);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_STREAM, 5, a));
        input.extend(frame(TYPE_CONTINUATION, 0, 5, b));
        input.extend(frame(TYPE_CONTINUATION, 0, 5, &[]));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 5, c));
        input.extend(frame(0x8, 0, 0, &[0, 0, 1, 0]));
        let out = run_all(&input).await.expect("rewrite");
        let frames = frames(&out);
        assert_eq!(frames.len(), 2, "one HEADERS frame and the WINDOW_UPDATE");
        assert_eq!(frames[1].kind, 0x8);
        assert_eq!(
            blocks(&frames),
            vec![(
                5,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                with_authority(&owned(&req), b"localhost")
            )]
        );
    }

    #[tokio::test]
    async fn padding_is_stripped_and_priority_kept() {
        let req = request(b"/run/berth/berth.sock", b"/x");
        let block = encode(&mut loona_hpack::Encoder::new(), &req);
        let priority = [0x80, 0, 0, 3, 15];
        let mut payload = vec![10];
        payload.extend_from_slice(&priority);
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0; 10]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY | FLAG_END_HEADERS,
            7,
            &payload,
        ));
        // Padding alone, and priority alone.
        let mut padded = vec![3];
        padded.extend_from_slice(&encode(&mut loona_hpack::Encoder::new(), &req));
        padded.extend_from_slice(&[0; 3]);
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_END_HEADERS,
            9,
            &padded,
        ));
        let mut prio = priority.to_vec();
        prio.extend_from_slice(&encode(&mut loona_hpack::Encoder::new(), &req));
        input.extend(frame(TYPE_HEADERS, FLAG_PRIORITY, 11, &prio));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 11, &[]));
        let out = run_all(&input).await.expect("rewrite");
        let frames = frames(&out);
        assert_eq!(frames.len(), 3);
        assert_eq!(frames[0].flags, FLAG_PRIORITY | FLAG_END_HEADERS);
        assert_eq!(frames[0].payload[..5], priority);
        assert_eq!(frames[1].flags, FLAG_END_HEADERS);
        assert_eq!(frames[2].flags, FLAG_PRIORITY | FLAG_END_HEADERS);
        assert_eq!(frames[2].payload[..5], priority);
        let want = with_authority(&owned(&req), b"localhost");
        assert_eq!(
            blocks(&frames),
            vec![
                (7, FLAG_PRIORITY | FLAG_END_HEADERS, want.clone()),
                (9, FLAG_END_HEADERS, want.clone()),
                (11, FLAG_PRIORITY | FLAG_END_HEADERS, want),
            ]
        );
    }

    #[tokio::test]
    async fn dynamic_table_references_across_requests() {
        // The first request adds its path, authority, content-type and te to the dynamic
        // table (literals with incremental indexing); the second refers to the socket-path
        // authority and the others by index only.
        fn string(s: &[u8], out: &mut Vec<u8>) {
            out.push(u8::try_from(s.len()).expect("short"));
            out.extend_from_slice(s);
        }
        let mut b1 = vec![0x83, 0x86, 0x44];
        string(b"/runtime.v1.RuntimeService/Version", &mut b1);
        b1.push(0x41);
        string(b"/run/berth/berth.sock", &mut b1);
        b1.push(0x5f);
        string(b"application/grpc", &mut b1);
        b1.push(0x40);
        string(b"te", &mut b1);
        string(b"trailers", &mut b1);
        let mut b2 = vec![0x83, 0x86, 0x04];
        string(b"/runtime.v1.RuntimeService/Status", &mut b2);
        b2.extend_from_slice(&[0xc0, 0xbf, 0xbe]);
        let first = request(
            b"/run/berth/berth.sock",
            b"/runtime.v1.RuntimeService/Version",
        );
        let second = request(
            b"/run/berth/berth.sock",
            b"/runtime.v1.RuntimeService/Status",
        );
        // RFC 7541 C.4.1 and C.4.2: Huffman-coded, the second block indexes the first's
        // `:authority` (a fresh connection context of its own).
        let c41 = hex::decode("828684418cf1e3c2e5f23a6ba0ab90f4ff").expect("hex");
        let c42 = hex::decode("828684be5886a8eb10649cbf").expect("hex");
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &b1));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &b2));
        let out = run_all(&input).await.expect("rewrite");
        let want1 = with_authority(&owned(&first), b"localhost");
        let want2 = with_authority(&owned(&second), b"localhost");
        assert_eq!(
            blocks(&frames(&out)),
            vec![(1, FLAG_END_HEADERS, want1), (3, FLAG_END_HEADERS, want2)]
        );

        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &c41));
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &c42));
        let out = run_all(&input).await.expect("rewrite");
        let get = |v: &[(&[u8], &[u8])]| -> Fields {
            v.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()
        };
        let base: &[(&[u8], &[u8])] = &[
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"www.example.com"),
        ];
        let mut second = get(base);
        second.push((b"cache-control".to_vec(), b"no-cache".to_vec()));
        assert_eq!(
            blocks(&frames(&out)),
            vec![
                (1, FLAG_END_HEADERS, get(base)),
                (3, FLAG_END_HEADERS, second)
            ]
        );
    }

    #[tokio::test]
    async fn large_blocks_are_split_at_16384() {
        let mut req = request(b"/run/berth/berth.sock", b"/x");
        req.push((b"x-big", vec![b'a'; 40_000]));
        let block = encode(&mut loona_hpack::Encoder::new(), &req);
        let mut input = PREFACE.to_vec();
        // Sent as one oversized frame (a peer that raised SETTINGS_MAX_FRAME_SIZE).
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS | FLAG_PRIORITY, 1, &{
            let mut p = vec![0, 0, 0, 0, 16];
            p.extend_from_slice(&block);
            p
        }));
        let out = run_all(&input).await.expect("rewrite");
        let frames = frames(&out);
        assert_eq!(frames.len(), 3);
        assert!(frames.iter().all(|f| f.payload.len() <= OUT_MAX_FRAME));
        assert_eq!(frames[0].payload.len(), OUT_MAX_FRAME);
        assert_eq!(frames[0].flags, FLAG_PRIORITY);
        assert_eq!(frames[1].kind, TYPE_CONTINUATION);
        assert_eq!(frames[1].flags, 0);
        assert_eq!(frames[2].flags, FLAG_END_HEADERS);
        // (Not assert_eq: the difference would print 40000 bytes.)
        assert!(
            blocks(&frames) == vec![(1, FLAG_PRIORITY, with_authority(&owned(&req), b"localhost"))],
            "the split block decodes to the request"
        );
    }

    #[tokio::test]
    async fn other_frames_pass_through_unchanged() {
        let mut input = PREFACE.to_vec();
        input.extend(settings());
        input.extend(frame(0x4, 0x1, 0, &[]));
        input.extend(frame(0x6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]));
        input.extend(frame(0x0, 0, 1, &vec![7; 100_000]));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, &[]));
        input.extend(frame(0x3, 0, 1, &[0, 0, 0, 8]));
        // Frame types the rewriter does not know, and a CONTINUATION outside any block
        // (for hyper to refuse).
        input.extend(frame(0xfa, 0xff, 9, b"unknown"));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 9, b"stray"));
        let out = run_all(&input).await.expect("pass through");
        assert_eq!(out, input);
    }

    async fn error_of(input: &[u8]) -> String {
        let e = run_all(input).await.expect_err("must fail");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        e.to_string()
    }

    #[tokio::test]
    async fn garbage_is_an_error() {
        let hdrs = |stream, flags, payload: &[u8]| {
            let mut input = PREFACE.to_vec();
            input.extend(frame(TYPE_HEADERS, flags, stream, payload));
            input
        };
        // Index 0, an index past the tables, a string longer than the block, an integer
        // that never ends, bad Huffman padding, a table size above the server's.
        for block in [
            &[0x80][..],
            &[0xff, 0x80, 0x01],
            &[0x00, 0x05, b'a'],
            &[0x82, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[0x00, 0x81, 0x00, 0x00],
            &[0x3f, 0xe1, 0xff, 0x03, 0x82],
        ] {
            let msg = error_of(&hdrs(1, FLAG_END_HEADERS, block)).await;
            assert!(msg.contains("header block of stream 1"), "{msg}");
        }
        assert!(
            error_of(b"GET / HTTP/1.1\r\n\r\n")
                .await
                .contains("preface")
        );
        // A flood of empty CONTINUATION frames in one block.
        let mut flood = hdrs(1, 0, &[0x82]);
        for _ in 0..=MAX_BLOCK_FRAMES {
            flood.extend(frame(TYPE_CONTINUATION, 0, 1, &[]));
        }
        assert!(error_of(&flood).await.contains("more than"));
        assert!(
            error_of(&hdrs(0, FLAG_END_HEADERS, &[0x82]))
                .await
                .contains("stream 0")
        );
        // Padding longer than the frame; priority cut short.
        assert!(
            error_of(&hdrs(1, FLAG_END_HEADERS | FLAG_PADDED, &[5, 0x82]))
                .await
                .contains("padding")
        );
        assert!(
            error_of(&hdrs(1, FLAG_END_HEADERS | FLAG_PADDED, &[]))
                .await
                .contains("padding")
        );
        assert!(
            error_of(&hdrs(1, FLAG_END_HEADERS | FLAG_PRIORITY, &[0, 0]))
                .await
                .contains("padding")
        );
        // Another frame inside a header block; a CONTINUATION of another stream.
        let mut input = hdrs(1, 0, &[0x82]);
        input.extend(frame(0x0, 0, 1, b"data"));
        assert!(error_of(&input).await.contains("inside the header block"));
        let mut input = hdrs(1, 0, &[0x82]);
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &[0x84]));
        assert!(error_of(&input).await.contains("inside the header block"));
        // A frame announcing more than the cap fails before its payload arrives.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0x10, 0, 1, TYPE_HEADERS, FLAG_END_HEADERS, 0, 0, 0, 1]);
        assert!(error_of(&input).await.contains("larger than"));
        // CONTINUATION frames adding up past the cap.
        let mut input = hdrs(1, 0, &[0x82]);
        for _ in 0..60 {
            input.extend(frame(TYPE_CONTINUATION, 0, 1, &[0x82; 20_000]));
        }
        assert!(error_of(&input).await.contains("larger than"));
        // A small block that decodes to more than the cap through the dynamic table.
        let mut block = vec![0x40, 0x01, b'x', 0x7f, 0xa1, 0x1e];
        block.extend_from_slice(&[b'y'; 4000]);
        block.extend_from_slice(&[0xbe; 300]);
        assert!(
            error_of(&hdrs(1, FLAG_END_HEADERS, &block))
                .await
                .contains("larger than")
        );
    }

    #[tokio::test]
    async fn a_cut_stream_ends_without_error() {
        let req = request(b"/run/berth/berth.sock", b"/x");
        let mut input = PREFACE.to_vec();
        input.extend(settings());
        let mut headers = frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &encode(&mut loona_hpack::Encoder::new(), &req),
        );
        headers.truncate(20);
        input.extend(headers);
        let out = run_all(&input).await.expect("EOF is not an error");
        assert_eq!(out, input[..PREFACE.len() + 15]);
    }
}
