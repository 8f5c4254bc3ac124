//! Where the variables come from: the process environment for the binary,
//! a map for tests, which then never read (or depend on) the developer's
//! real `IDEMPROXY_*` variables. The model is linkerd's `Strings` trait
//! (`linkerd/app/src/env.rs`).
//!
//! ```
//! use std::collections::HashMap;
//! use idemproxy::config::{Args, Config};
//! let env = HashMap::from([("IDEMPROXY_CONNECT_TIMEOUT".to_owned(), "5s".to_owned())]);
//! let args = Args::try_parse_from_strings(["idemproxy", "--upstream", "http://127.0.0.1:8080"], &env).unwrap();
//! let config = Config::from_args(&args).unwrap();
//! assert_eq!(config.upstream.connect_timeout, std::time::Duration::from_secs(5));
//! ```

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::hash::BuildHasher;

/// A source of variables, by name.
pub trait Strings {
    /// The value of the variable `key`, if it is set.
    fn get(&self, key: &str) -> Option<OsString>;

    /// The names of the variables that are set and start with `prefix`.
    fn names_with_prefix(&self, prefix: &str) -> Vec<String>;
}

/// The process environment: what the binary reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Strings for ProcessEnv {
    fn get(&self, key: &str) -> Option<OsString> {
        std::env::var_os(key)
    }

    fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .filter(|name| name.starts_with(prefix))
            .collect()
    }
}

impl<S: BuildHasher> Strings for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<OsString> {
        HashMap::get(self, key).map(OsString::from)
    }

    fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.keys()
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect()
    }
}

impl Strings for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<OsString> {
        BTreeMap::get(self, key).map(OsString::from)
    }

    fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.keys()
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect()
    }
}
