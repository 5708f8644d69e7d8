//! berthd's connections to the monitor: accepting them, reading requests, answering them
//! (see `proto/monitor.md`), and the fds passed over them.

use super::io::close_output;
use super::*;

impl Monitor {
    pub(super) fn accept_conns(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.conns.push(Conn {
                        id: self.next_conn,
                        stream,
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                        busy: false,
                        eof: false,
                        dead: false,
                        attached: None,
                        attach_ended: false,
                    });
                    self.next_conn += 1;
                }
                Err(e) if e.kind() == IoErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    pub(super) fn conn_io(&mut self, i: usize, revents: libc::c_short) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !c.eof {
            loop {
                match c.stream.read(&mut self.buf) {
                    Ok(0) => {
                        c.eof = true;
                        break;
                    }
                    Ok(n) => {
                        c.inbuf.extend_from_slice(&self.buf[..n]);
                        if c.inbuf.len() > MAX_LINE + 1 && !c.inbuf.contains(&b'\n') {
                            let resp =
                                Response::error(ErrorKind::BadRequest, "request line too long");
                            push_response(c, &resp);
                            c.inbuf.clear();
                            c.eof = true;
                            break;
                        }
                    }
                    Err(e) if e.kind() == IoErrorKind::Interrupted => {}
                    Err(e) if e.kind() == IoErrorKind::WouldBlock => break,
                    Err(_) => {
                        c.dead = true;
                        return;
                    }
                }
            }
        }
        flush_conn(c);
    }

    pub(super) fn process_requests(&mut self) {
        for i in 0..self.conns.len() {
            if self.conns[i].attached.is_some() {
                self.attach_input(i);
            }
            loop {
                let c = &mut self.conns[i];
                if c.busy || c.dead || c.attached.is_some() {
                    break;
                }
                let Some(nl) = c.inbuf.iter().position(|&b| b == b'\n') else {
                    break;
                };
                let line: Vec<u8> = c.inbuf.drain(..=nl).collect();
                let conn_id = c.id;
                let resp = match serde_json::from_slice::<Request>(&line) {
                    Ok(req) => self.handle(conn_id, req),
                    Err(e) => Some(Response::error(
                        ErrorKind::BadRequest,
                        format!("bad request: {e}"),
                    )),
                };
                let c = &mut self.conns[i];
                match resp {
                    Some(r) => push_response(c, &r),
                    None => c.busy = true,
                }
            }
            let c = &mut self.conns[i];
            flush_conn(c);
            if c.eof && !c.busy && c.outbuf.is_empty() && !c.inbuf.contains(&b'\n') {
                c.dead = true;
            }
        }
    }

    /// Handles one request; `None` when the answer comes later (create).
    pub(super) fn handle(&mut self, conn: u64, req: Request) -> Option<Response> {
        let find = |cs: &mut Vec<Container>, id: &str| cs.iter().position(|c| c.id == id);
        let not_found =
            |id: &str| Response::error(ErrorKind::NotFound, format!("container {id} not found"));
        Some(match req {
            Request::Create(req) => return self.create(conn, req),
            Request::Reopen { id } => match find(&mut self.containers, &id) {
                None => not_found(&id),
                Some(k) => match self.containers[k].log.reopen() {
                    Ok(()) => Response::Ok,
                    Err(e) => Response::error(
                        ErrorKind::Io,
                        format!("reopening {}: {e}", self.containers[k].log.path().display()),
                    ),
                },
            },
            Request::Attach { id } => match find(&mut self.containers, &id) {
                None => not_found(&id),
                Some(_) => {
                    if let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) {
                        c.attached = Some(id);
                    }
                    Response::Ok
                }
            },
            Request::CloseStdin { id } => match find(&mut self.containers, &id) {
                None => not_found(&id),
                Some(k) => {
                    self.containers[k].stdin = None;
                    Response::Ok
                }
            },
            Request::State => Response::State {
                containers: self
                    .containers
                    .iter()
                    .filter(|c| c.pid != 0)
                    .map(|c| ContainerState {
                        id: c.id.clone(),
                        pid: c.pid,
                        exited: c.exited,
                    })
                    .collect(),
            },
            Request::Forget { id } => {
                if let Some(k) = self.creates.iter().position(|p| p.id == id) {
                    // Its runtime is killed; answered once it is reaped (nothing of the
                    // create runs any more then).
                    self.kill_create(k, Killed::Forgotten);
                    self.creates[k].forget_conns.push(conn);
                    return None;
                } else {
                    match find(&mut self.containers, &id) {
                        None => not_found(&id),
                        Some(k) => {
                            let mut c = self.containers.remove(k);
                            for mut o in std::mem::take(&mut c.outputs) {
                                close_output(&mut o, &mut c.log);
                            }
                            self.diag(&format!("container {id} forgotten"));
                            Response::Ok
                        }
                    }
                }
            }
            Request::Shutdown => {
                if !self.shutting_down {
                    self.diag("shutdown requested");
                }
                self.shutting_down = true;
                Response::Ok
            }
        })
    }
}

pub(super) fn push_response(c: &mut Conn, r: &Response) {
    match serde_json::to_vec(r) {
        Ok(mut v) => {
            v.push(b'\n');
            c.outbuf.extend_from_slice(&v);
        }
        Err(_) => c.outbuf.extend_from_slice(
            b"{\"result\":\"error\",\"kind\":\"io\",\"message\":\"cannot encode response\"}\n",
        ),
    }
}

pub(super) fn flush_conn(c: &mut Conn) {
    while !c.outbuf.is_empty() && !c.dead {
        match c.stream.write(&c.outbuf) {
            Ok(n) => {
                c.outbuf.drain(..n);
            }
            Err(e) if e.kind() == IoErrorKind::Interrupted => {}
            Err(e) if e.kind() == IoErrorKind::WouldBlock => return,
            Err(_) => c.dead = true,
        }
    }
}

/// Receives one fd (runc's `--console-socket` protocol: the terminal master via
/// SCM_RIGHTS).
pub(super) fn receive_fd(stream: &UnixStream) -> std::io::Result<OwnedFd> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut data = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut data)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut got: Option<OwnedFd> = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed these fds in our table; we own them.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(owned);
                }
            }
        }
    }
    got.ok_or_else(|| std::io::Error::other("no fd received on the console socket"))
}
