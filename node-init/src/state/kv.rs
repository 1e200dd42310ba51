//! The keyed store inside the state machine (etcd's model): users' own data and the cluster
//! settings, each key with its create and mod revisions and a version.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A keyed-store write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Sets `key`. With `prev_revision`, only if the key's current `mod_revision` equals it
    /// (0: only if the key does not exist).
    Put {
        key: String,
        value: String,
        prev_revision: Option<u64>,
    },
    Delete {
        key: String,
        prev_revision: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    /// Revision at which the key was created (since its last deletion).
    pub create_revision: u64,
    /// Revision of the last change to the key.
    pub mod_revision: u64,
    /// Number of writes since creation.
    pub version: u64,
}

/// The keys and their values, in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KvStore {
    data: BTreeMap<String, KeyValue>,
}

impl KvStore {
    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.data.get(key)
    }

    /// Keys starting with `prefix`, in key order.
    pub fn range<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KeyValue> + 'a {
        self.data.range(prefix.to_string()..).take_while(move |(k, _)| k.starts_with(prefix)).map(|(_, v)| v)
    }

    pub fn put(&mut self, key: &str, value: &str, revision: u64) {
        let entry = self.data.entry(key.to_string()).or_insert_with(|| KeyValue {
            key: key.to_string(),
            value: String::new(),
            create_revision: revision,
            mod_revision: revision,
            version: 0,
        });
        entry.value = value.to_string();
        entry.mod_revision = revision;
        entry.version += 1;
    }

    /// Inserts a key as it was (a snapshot of the first release being converted).
    pub fn insert(&mut self, kv: KeyValue) {
        self.data.insert(kv.key.clone(), kv);
    }

    pub fn remove(&mut self, key: &str) -> Option<KeyValue> {
        self.data.remove(key)
    }
}
