//! SPDY/3.1, as far as the Kubernetes streaming protocols use it: [`frame`] is the framing
//! and header compression, [`conn`] a server connection over an upgraded HTTP/1.1 socket. No
//! maintained Rust crate speaks SPDY/3.1, so berth keeps this small one.

pub mod conn;
mod dictionary;
pub mod frame;
