//! Containers: records and lifecycle ([`manager`]), the rootfs overlay ([`rootfs`]), the
//! host-side mounts of volumes ([`volumes`]), the CRI container config turned into an OCI
//! runtime spec ([`spec`], [`seccomp`], [`user`]), CDI devices edited into it ([`cdi`]), stop
//! signals ([`signal`]).
pub mod cdi;
pub mod manager;
pub mod quiet;
pub mod rootfs;
pub mod seccomp;
pub mod signal;
pub mod spec;
pub mod user;
pub mod volumes;
