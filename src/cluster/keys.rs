//! Where the hubs' shared state lives in etcd, under the farm's prefix (pure).
//!
//! ```text
//! <prefix>state              the cycle state (HubState, JSON)
//! <prefix>state-version      its version, decimal: what the compare-and-swap compares
//! <prefix>releases/<id>      a manifest's canonical bytes (checked against <id> when read)
//! <prefix>release-at/<id>    when it was last stored, µs since the epoch (for collection)
//! <prefix>signatures/<id>    the publishers' signatures of the release (JSON)
//! <prefix>provenance/<id>    the changesets the release was built from (JSON)
//! <prefix>leader             the name of the hub that does the once-only duties (leased)
//! <prefix>hubs/<name>        one key per live hub (leased): the URL of its sync API
//! <prefix>agents/<name>      an agent's last report, as the hub it reported to received it
//! <prefix>drain/<pool>/<backend>  a backend drained or enabled by an operator on any appliance
//! ```

use crate::sync::manifest::ReleaseId;

/// The keys of one farm.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// What a key beside a release holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beside {
    /// The manifest.
    Release,
    /// When it was last stored.
    StoredAt,
    /// The publishers' signatures.
    Signatures,
    /// The provenance.
    Provenance,
}

impl Beside {
    /// Every key kept for a release.
    pub const ALL: [Beside; 4] = [
        Beside::Release,
        Beside::StoredAt,
        Beside::Signatures,
        Beside::Provenance,
    ];

    fn dir(self) -> &'static str {
        match self {
            Beside::Release => "releases/",
            Beside::StoredAt => "release-at/",
            Beside::Signatures => "signatures/",
            Beside::Provenance => "provenance/",
        }
    }
}

impl Keys {
    /// The keys under `prefix` (which ends in `/`).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// The cycle state.
    pub fn state(&self) -> String {
        format!("{}state", self.prefix)
    }

    /// The cycle state's version.
    pub fn state_version(&self) -> String {
        format!("{}state-version", self.prefix)
    }

    /// What is kept for release `id`.
    pub fn release(&self, what: Beside, id: &ReleaseId) -> String {
        format!("{}{}{id}", self.prefix, what.dir())
    }

    /// The prefix of every key of one kind.
    pub fn all(&self, what: Beside) -> String {
        format!("{}{}", self.prefix, what.dir())
    }

    /// The release a key of kind `what` is for (`None`: not such a key).
    pub fn release_of(&self, what: Beside, key: &[u8]) -> Option<ReleaseId> {
        std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&self.all(what))?
            .parse()
            .ok()
    }

    /// The leader's key.
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }

    /// Hub `name`'s key (`""`: the prefix of every hub's).
    pub fn hub(&self, name: &str) -> String {
        format!("{}hubs/{name}", self.prefix)
    }

    /// What the appliances share of ACME: `kind` (`cert`, `http01`, `alpn01`) and its id
    /// (`"", ""`: the prefix of all of it).
    pub fn acme(&self, kind: &str, id: &str) -> String {
        if kind.is_empty() {
            return format!("{}acme/", self.prefix);
        }
        format!("{}acme/{kind}/{id}", self.prefix)
    }

    /// Backend `backend` of `pool`'s drain (`"", ""`: the prefix of every drain).
    pub fn drain(&self, pool: &str, backend: &str) -> String {
        if pool.is_empty() {
            return format!("{}drain/", self.prefix);
        }
        format!("{}drain/{pool}/{backend}", self.prefix)
    }

    /// Agent `name`'s report (`""`: the prefix of every agent's).
    pub fn agent(&self, name: &str) -> String {
        format!("{}agents/{name}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::Hash;

    #[test]
    fn every_key_is_under_the_prefix_and_release_keys_name_their_release() {
        let k = Keys::new("/farm-a/");
        let id = Hash::of(b"manifest");
        assert_eq!(k.state(), "/farm-a/state");
        assert_eq!(k.state_version(), "/farm-a/state-version");
        assert_eq!(k.leader(), "/farm-a/leader");
        assert_eq!(k.hub("hub-1"), "/farm-a/hubs/hub-1");
        assert_eq!(k.agent("web-1"), "/farm-a/agents/web-1");
        assert!(k.agent("web-1").starts_with(&k.agent("")));
        assert_eq!(k.drain("www", "a"), "/farm-a/drain/www/a");
        assert!(k.drain("www", "a").starts_with(&k.drain("", "")));
        for what in Beside::ALL {
            let key = k.release(what, &id);
            assert!(key.starts_with(&k.all(what)), "{key}");
            assert_eq!(k.release_of(what, key.as_bytes()), Some(id));
            for other in Beside::ALL.into_iter().filter(|o| *o != what) {
                assert_eq!(k.release_of(other, key.as_bytes()), None, "{key}");
            }
        }
        // Another farm's keys, and junk under the prefix, are not ours.
        let other = Keys::new("/farm-b/").release(Beside::Release, &id);
        assert_eq!(k.release_of(Beside::Release, other.as_bytes()), None);
        assert_eq!(k.release_of(Beside::Release, b"/farm-a/releases/zz"), None);
        // The state's keys are not under any release prefix.
        assert!(!k.state_version().starts_with(&k.all(Beside::Release)));
    }
}
