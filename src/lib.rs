//! berth: a Kubernetes node container runtime speaking the CRI.
//!
//! One module per piece of the runtime (see `DESIGN.md`):
//! - [`config`]: the TOML configuration contract and its defaults;
//! - [`store`]: the durable embedded database of berth's records;
//! - [`image`]: registry pulls, the content store, layer snapshots, image records;
//! - [`network`]: pod networking, native (rtnetlink + nftables) or CNI;
//! - [`ns`]: namespace work on dedicated threads, pinned namespaces;
//! - [`sandbox`]: pod sandboxes: namespaces, pod files, sysctls, pod init, records;
//! - [`server`]: the CRI gRPC services on the unix socket.

pub mod config;
pub mod image;
pub mod locks;
pub mod network;
pub mod ns;
pub mod sandbox;
pub mod server;
pub mod store;
