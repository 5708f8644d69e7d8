//! A pseudo-terminal for tty execs: berthd keeps the master (non-blocking, read and written
//! through tokio), the exec's runtime gets the slave as its stdio.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use nix::fcntl::{OFlag, open};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::stat::Mode;
use tokio::io::unix::AsyncFd;

/// The master side of a pty.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

/// A new pty: its master and an fd of its slave (both close-on-exec).
pub fn open_pty() -> std::io::Result<(PtyMaster, OwnedFd)> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    let slave = open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: the fd comes from `into_raw_fd`, so it is open and owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    let flags = nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_GETFL)?;
    nix::fcntl::fcntl(
        &master,
        nix::fcntl::FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )?;
    // SAFETY: an OwnedFd's fd is valid and stays the same until the AsyncFd drops it.
    let fd = unsafe { AsyncFd::register(master) }.map_err(std::io::Error::from)?;
    Ok((PtyMaster { fd }, slave))
}

impl PtyMaster {
    /// Reads what the terminal's programs wrote; 0 once every slave fd is closed.
    pub async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.get_ref(), buf).map_err(Into::into)) {
                Ok(Ok(n)) => return Ok(n),
                // EIO: the slave side hung up.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `data` (keyboard input for the terminal).
    pub async fn write_all(&self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(Into::into)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Sets the terminal's size (TIOCSWINSZ).
    pub fn resize(&self, width: u16, height: u16) -> std::io::Result<()> {
        let ws = libc::winsize {
            ws_row: height,
            ws_col: width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which outlives the call.
        let r = unsafe { libc::ioctl(self.fd.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
