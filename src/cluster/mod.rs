//! Several appliances, one farm: the hub's state shared in etcd (`sync.cluster`).
//!
//! One appliance needs none of this: its hub keeps its state in its own
//! [`FsStore`](crate::sync::store::FsStore). With `sync.cluster`, every hub keeps it in one
//! etcd cluster through [`EtcdStore`], behind the same [`HubStore`](crate::sync::store::HubStore)
//! seam: the cycle compare-and-swap becomes an etcd transaction (one winner across all hubs),
//! each hub follows the state with a watch (its long polls see other hubs' changes), and the
//! duties that must happen once go to the hub holding the leader key under its lease.
//!
//! - [`keys`]: where each part of the state lives in etcd (pure)
//! - [`etcd`]: the store, its watch and its lease
//! - [`peers`]: the other hubs, for the blobs this hub lacks and for a commit's replicas

pub mod etcd;
pub mod keys;
pub mod peers;

pub use etcd::EtcdStore;
pub use peers::Peers;
