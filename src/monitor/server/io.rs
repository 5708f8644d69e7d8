//! The containers' stdio in the monitor: reading their output into the CRI log and to
//! attached clients, writing attach input to their stdin, and the pipes behind them.

use super::*;

impl Monitor {
    pub(super) fn read_output(&mut self, i: usize, j: usize) {
        let Some(c) = self.containers.get_mut(i) else {
            return;
        };
        let mut total = 0;
        loop {
            let Some(o) = c.outputs.get_mut(j) else {
                return;
            };
            let Some(fd) = o.fd.as_mut() else { return };
            let r = fd.read(&mut self.buf);
            match r {
                Ok(0) => break close_output(o, &mut c.log),
                Ok(n) => {
                    let stream = o.stream;
                    let kind = match stream {
                        Stream::Stdout => attach::OUT_STDOUT,
                        Stream::Stderr => attach::OUT_STDERR,
                    };
                    for a in self.conns.iter_mut() {
                        if a.attached.as_deref() == Some(c.id.as_str())
                            && !a.dead
                            && a.outbuf.len() < attach::ATTACH_BUFFER
                        {
                            attach::push_frame(&mut a.outbuf, kind, &self.buf[..n]);
                        }
                    }
                    let log = &mut c.log;
                    o.splitter.feed(&self.buf[..n], &mut |tag, line| {
                        let _ = log.write_line(stream, tag, line);
                    });
                    total += n;
                    if total >= READ_BUDGET {
                        return;
                    }
                }
                Err(e) if e.kind() == IoErrorKind::Interrupted => {}
                Err(e) if e.kind() == IoErrorKind::WouldBlock => return,
                // EIO: the terminal's other side is closed; anything else ends it too.
                Err(_) => break close_output(o, &mut c.log),
            }
        }
    }

    // ---- signals and exits ----

    /// Applies the frames an attacher sent: stdin bytes (queued, written as the pipe takes
    /// them), stdin close, terminal resize.
    pub(super) fn attach_input(&mut self, i: usize) {
        let Some(id) = self.conns[i].attached.clone() else {
            return;
        };
        let Some(k) = self.containers.iter().position(|c| c.id == id) else {
            self.conns[i].dead = true;
            return;
        };
        loop {
            // Input waits while the container has not taken what came before.
            if self.containers[k].stdin_buf.len() >= attach::ATTACH_BUFFER {
                break;
            }
            let frame = match attach::take_frame(&mut self.conns[i].inbuf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    self.conns[i].dead = true;
                    return;
                }
            };
            let c = &mut self.containers[k];
            match frame {
                (attach::IN_STDIN, data) if c.stdin.is_some() => {
                    c.stdin_buf.extend_from_slice(&data);
                }
                (attach::IN_CLOSE_STDIN, _) => {
                    write_stdin(c);
                    c.stdin_buf.clear();
                    c.stdin = None;
                }
                (attach::IN_RESIZE, size) if size.len() == 4 => {
                    let ws = libc::winsize {
                        ws_col: u16::from_be_bytes([size[0], size[1]]),
                        ws_row: u16::from_be_bytes([size[2], size[3]]),
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    let fds = c
                        .outputs
                        .iter()
                        .filter_map(|o| o.fd.as_ref())
                        .chain(c.stdin.as_ref());
                    for fd in fds {
                        // SAFETY: TIOCSWINSZ reads one winsize from a pointer that outlives
                        // the call; on a pipe it fails with ENOTTY and changes nothing.
                        unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                    }
                }
                _ => {}
            }
        }
        write_stdin(&mut self.containers[k]);
        if self.conns[i].eof && self.conns[i].inbuf.is_empty() && self.conns[i].outbuf.is_empty() {
            self.conns[i].dead = true;
        }
    }

    /// Tells attachers of containers whose output ended (or that are gone) that it did.
    pub(super) fn end_attaches(&mut self) {
        for a in self.conns.iter_mut() {
            let Some(id) = a.attached.as_deref() else {
                continue;
            };
            if a.attach_ended {
                continue;
            }
            let ended = self
                .containers
                .iter()
                .find(|c| c.id == id)
                .is_none_or(|c| c.outputs.is_empty() && (c.pid == 0 || c.reaped.is_some()));
            if ended {
                attach::push_frame(&mut a.outbuf, attach::OUT_END, &[]);
                a.attach_ended = true;
                a.eof = true;
            }
        }
    }
}

/// Writes what the container's stdin takes of its queued attach input, without blocking.
pub(super) fn write_stdin(c: &mut Container) {
    let Some(fd) = c.stdin.as_mut() else {
        c.stdin_buf.clear();
        return;
    };
    if let Ok(flags) = fcntl(&*fd, FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_truncate(flags);
        if !flags.contains(OFlag::O_NONBLOCK) {
            let _ = fcntl(&*fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK));
        }
    }
    while !c.stdin_buf.is_empty() {
        match fd.write(&c.stdin_buf) {
            Ok(n) => {
                c.stdin_buf.drain(..n);
            }
            Err(e) if e.kind() == IoErrorKind::Interrupted => {}
            Err(e) if e.kind() == IoErrorKind::WouldBlock => return,
            Err(_) => {
                // The container closed its stdin: input has nowhere to go.
                c.stdin_buf.clear();
                return;
            }
        }
    }
}

/// Flushes what is left of an output into the log and closes its fd.
pub(super) fn close_output(o: &mut Output, log: &mut CriLog) {
    let stream = o.stream;
    o.splitter.finish(&mut |tag: Tag, line: &[u8]| {
        let _ = log.write_line(stream, tag, line);
    });
    o.fd = None;
}

pub(super) fn output(fd: OwnedFd, stream: Stream) -> std::io::Result<Output> {
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL)?;
    fcntl(
        fd.as_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )?;
    Ok(Output {
        fd: Some(File::from(fd)),
        stream,
        splitter: LineSplitter::default(),
    })
}

/// A pipe whose ends are close-on-exec (the runtime gets them as stdio via dup2).
pub(super) fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(pipe2(OFlag::O_CLOEXEC)?)
}
