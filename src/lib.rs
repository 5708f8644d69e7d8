//! berth: a Kubernetes node container runtime speaking the CRI.
//!
//! One module per piece of the runtime (see `DESIGN.md`):
//! - [`config`]: the TOML configuration contract and its defaults;
//! - [`store`]: the durable embedded database of berth's records;
//! - [`image`]: registry pulls, the content store, layer snapshots, image records;
//! - [`server`]: the CRI gRPC services on the unix socket.

pub mod config;
pub mod image;
pub mod server;
pub mod store;
