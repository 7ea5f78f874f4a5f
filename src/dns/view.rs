//! What the DNS responder reads per query: the zones of one config generation with that
//! generation's pool table (whose health snapshots decide who is listed), swapped whole at
//! every reload. The appliance builds it beside the proxy's live state; a query loads the
//! pointer once.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::zone::{next_serial, Zones};
use crate::config::Config;
use crate::pools::table::Table;

/// One generation of what DNS answers from.
pub struct View {
    /// The zones, when the config has a `dns:` section.
    pub zones: Option<Arc<Zones>>,
    /// The pools whose health the answers follow (the same generation as `zones`).
    pub table: Arc<Table>,
}

/// The swapped pointer to the DNS view.
pub type SharedView = Arc<ArcSwap<View>>;

impl View {
    /// The view of `config` and its `table`; the zones' serial moves past `previous`'s, from
    /// `unix_now` (seconds, read by the caller).
    pub fn build(
        config: &Config,
        table: Arc<Table>,
        previous: Option<&View>,
        unix_now: u64,
    ) -> View {
        let zones = config.dns.as_ref().map(|d| {
            let previous = previous.and_then(|p| p.zones.as_ref()).map(|z| z.serial);
            Arc::new(Zones::build(d, next_serial(previous, unix_now)))
        });
        View { zones, table }
    }
}
