//! Backend profiles (`IDEMPROXY_PROFILE`): one name sets idemproxy up for a
//! backend's real wire protocol. A profile is nothing but ordinary route
//! lines and option values, so what it does is what a user could write:
//! `--check-config` prints the expansion, and the README has each recipe.
//!
//! The expansion happens on the option texts, before validation:
//! - the profile's routes come *after* the user's own `IDEMPROXY_ROUTES`
//!   lines, so that the user's lines match first and win;
//! - each option the profile sets applies only where the user left that
//!   option at its default; two profiles that set one option differently
//!   are refused (a sidecar fronts one backend: name one profile, or write
//!   the table yourself).
//!
//! A profile never makes a request unsafe: where it cannot know whether a
//! call is idempotent, it leaves the call to the replay rules (a POST is not
//! replayed after it may have been processed) or says `replay=unsafe`.
//!
//! ```
//! use std::collections::HashMap;
//! use idemproxy::config::{Args, Config};
//! let args = Args::try_parse_from_strings(
//!     ["idemproxy", "--upstream", "http://127.0.0.1:2379", "--profile", "etcd"],
//!     &HashMap::new(),
//! )
//! .unwrap();
//! let config = Config::from_args(&args).unwrap();
//! assert!(config.render().contains("IDEMPROXY_HEARTBEAT_ALIVE_FIELD=result.TTL"));
//! ```

use super::args::Args;
use super::checker::ConfigIssue;
use super::options::{self, Describe};

/// One backend profile.
pub struct Profile {
    /// The name `IDEMPROXY_PROFILE` takes.
    pub name: &'static str,
    /// One line for `--help` and the README.
    pub summary: &'static str,
    /// Route lines, appended after the user's own.
    pub routes: &'static str,
    /// Option values, each applied unless the user gave the option.
    pub options: &'static [(&'static dyn Describe, &'static str)],
}

/// Every profile, in the order `--help` lists them.
pub const PROFILES: &[Profile] = &[
    Profile {
        // Replayed after a lost answer: the methods that read and change
        // nothing, and `initialize` (a replay only repeats the handshake).
        // `tools/call`, `prompts/get`, `completion/complete` and anything
        // else are not: a tool may send mail.
        name: "mcp",
        summary: "MCP Streamable HTTP servers (2025-03-26 to 2025-11-25): session from Mcp-Session-Id, ping heartbeats, tools/call never replayed",
        routes: concat!(
            "POST /{*path} if-json=method=initialize replay=safe session=response-header:Mcp-Session-Id heartbeat=POST:/{*path}\n",
            "POST /{*path} if-json=method=",
            "ping|tools/list|resources/list|resources/templates/list|resources/read|prompts/list",
            " replay=safe session=header:Mcp-Session-Id heartbeat=POST:/{*path}\n",
            // Every request names the endpoint, so a session first seen
            // mid-life (after a restart of the sidecar) gets its pings too.
            "POST /{*path} session=header:Mcp-Session-Id heartbeat=POST:/{*path}\n",
            "GET /{*path} session=header:Mcp-Session-Id heartbeat=POST:/{*path}\n",
            "DELETE /{*path} session=header:Mcp-Session-Id session-end",
        ),
        options: &[
            (&options::REQUESTS_RENEW, "on"),
            (
                &options::HEARTBEAT_BODY,
                r#"{"jsonrpc":"2.0","id":"idemproxy-ping","method":"ping"}"#,
            ),
            (
                &options::HEARTBEAT_SET_HEADERS,
                "accept: application/json, text/event-stream",
            ),
            (
                &options::HEARTBEAT_HEADERS,
                "authorization,cookie,mcp-protocol-version",
            ),
        ],
    },
    Profile {
        name: "etcd",
        summary: "etcd v3 JSON gateway leases: session from a grant's ID, keepalive heartbeats every TTL/3, revoke ends it",
        routes: "POST /v3/lease/grant session=response-json:ID lease-ttl=response-json:TTL\n\
                 POST /v3/lease/keepalive session=json:ID renews\n\
                 POST /v3/lease/revoke session=json:ID session-end\n\
                 POST /v3/kv/lease/revoke session=json:ID session-end\n\
                 POST /v3/lease/timetolive replay=safe\n\
                 POST /v3/kv/range replay=safe\n\
                 POST /v3/kv/put session=json:lease renews=off",
        options: &[
            (&options::HEARTBEAT, "POST /v3/lease/keepalive"),
            (&options::HEARTBEAT_BODY, r#"{"ID":"{session}"}"#),
            (&options::HEARTBEAT_ALIVE_FIELD, "result.TTL"),
        ],
    },
    Profile {
        name: "couchdb",
        summary: "CouchDB (and PouchDB Server): a document create's 409 verified by a GET and answered as CouchDB answers a create",
        routes: concat!(
            "PUT /{db}/{doc} if-json=!_rev if-query=!rev verify=same match=json-subset recovered-status=201 ",
            r#"recovered-body={"ok":true,"id":"{stored._id}","rev":"{stored._rev}"}"#,
            "\n",
            "POST /{db} if-json=_id if-json=!_rev verify=GET:/{db}/{body._id} match=json-subset recovered-status=201 ",
            r#"recovered-body={"ok":true,"id":"{stored._id}","rev":"{stored._rev}"}"#,
            "\n",
            // An update or delete names the revision it replaces: a replay
            // after it was stored meets a 409, and a client that handles that
            // conflict by re-applying its change would apply it twice.
            "PUT /{db}/{doc} replay=unsafe\n",
            "DELETE /{db}/{doc} replay=unsafe",
        ),
        options: &[],
    },
    Profile {
        name: "azure-table",
        summary: "Azure Table storage (and Azurite): an entity insert's 409 verified by a GET of PartitionKey/RowKey, SAS kept",
        routes: concat!(
            "POST /Tables\n",
            "POST /{account}/Tables\n",
            "POST /{table} if-header=prefer=return-no-content verify=GET:/{table}(PartitionKey='{body.PartitionKey}',RowKey='{body.RowKey}')?{query} match=json-subset match-ignore=*@odata.type recovered-status=204\n",
            "POST /{table} verify=GET:/{table}(PartitionKey='{body.PartitionKey}',RowKey='{body.RowKey}')?{query} match=json-subset match-ignore=*@odata.type recovered-status=201\n",
            "POST /{account}/{table} if-header=prefer=return-no-content verify=GET:/{account}/{table}(PartitionKey='{body.PartitionKey}',RowKey='{body.RowKey}')?{query} match=json-subset match-ignore=*@odata.type recovered-status=204\n",
            "POST /{account}/{table} verify=GET:/{account}/{table}(PartitionKey='{body.PartitionKey}',RowKey='{body.RowKey}')?{query} match=json-subset match-ignore=*@odata.type recovered-status=201",
        ),
        options: &[],
    },
    Profile {
        name: "azure-blob-lease",
        summary: "Azure Blob leases (and Azurite): acquire registers the lease, renew heartbeats every duration/3, release or break ends it",
        routes: concat!(
            // An acquire with a proposed id is idempotent (the SDKs send one);
            // one without is not: a replay would meet the first one's lease.
            "PUT /{container}/{*blob} if-query=comp=lease if-header=x-ms-lease-action=acquire if-header=x-ms-proposed-lease-id ",
            "session=response-header:x-ms-lease-id lease-ttl=header:x-ms-lease-duration ",
            "heartbeat=PUT:/{container}/{*blob}?{query}\n",
            "PUT /{container}/{*blob} if-query=comp=lease if-header=x-ms-lease-action=acquire replay=unsafe ",
            "session=response-header:x-ms-lease-id lease-ttl=header:x-ms-lease-duration ",
            "heartbeat=PUT:/{container}/{*blob}?{query}\n",
            "PUT /{container}/{*blob} if-query=comp=lease if-header=x-ms-lease-action=renew session=header:x-ms-lease-id renews\n",
            "PUT /{container}/{*blob} if-query=comp=lease if-header=x-ms-lease-action=release|break replay=unsafe session=header:x-ms-lease-id session-end\n",
            // A change hands the lease to a new id, which the client then
            // renews: the old id's heartbeats stop (they would fail, and after
            // the lease expired, take it back).
            "PUT /{container}/{*blob} if-query=comp=lease if-header=x-ms-lease-action=change replay=unsafe session=header:x-ms-lease-id session-end\n",
            "PUT /{container}/{*blob} if-query=comp=lease replay=unsafe\n",
            "* /{container}/{*blob} session=header:x-ms-lease-id renews=off",
        ),
        options: &[
            (
                &options::HEARTBEAT_SET_HEADERS,
                "x-ms-lease-action: renew; x-ms-lease-id: {session}",
            ),
            (&options::HEARTBEAT_HEADERS, "x-ms-version"),
        ],
    },
    Profile {
        name: "session-api",
        summary: "the bundled example session backend (examples/session_backend.rs)",
        routes: "POST /v1/sessions session=response-json:id\n\
                 POST /v1/sessions/{sid}/entries session=path:sid verify=GET:/v1/sessions/{sid}/entries/{body.uuid}\n\
                 DELETE /v1/sessions/{sid} session=path:sid session-end\n\
                 * /v1/sessions/{sid}/{*rest} session=path:sid",
        options: &[(&options::HEARTBEAT, "POST /v1/sessions/{session}/heartbeat")],
    },
];

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("name", &self.name)
            .field("routes", &self.routes)
            .field(
                "options",
                &self
                    .options
                    .iter()
                    .map(|(o, v)| (o.name(), v))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The profile called `name`.
pub fn find(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// The known profile names in `text` (`IDEMPROXY_PROFILE`), in order, once each.
pub fn names_in(text: &str) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for profile in text.split(',').filter_map(|n| find(n.trim())) {
        if !out.contains(&profile.name) {
            out.push(profile.name);
        }
    }
    out
}

/// The profile names, comma-separated (for help and errors).
pub fn names() -> String {
    PROFILES
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `args` with the profiles of `IDEMPROXY_PROFILE` expanded into routes
/// and options, or every problem found.
pub(super) fn expand(args: &Args) -> Result<Args, Vec<ConfigIssue>> {
    let text = args.get(&options::PROFILE).unwrap_or_default();
    let mut issues = Vec::new();
    let mut chosen: Vec<&Profile> = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match find(name) {
            Some(p) if chosen.iter().any(|c| c.name == p.name) => {}
            Some(p) => chosen.push(p),
            None => issues.push(invalid(
                text,
                format!(
                    "one or more of {} (comma-separated); {name:?} is none",
                    names()
                ),
            )),
        }
    }
    let mut out = args.clone();
    if chosen.is_empty() {
        return if issues.is_empty() {
            Ok(out)
        } else {
            Err(issues)
        };
    }
    let mut routes = args
        .get(&options::ROUTES)
        .unwrap_or_default()
        .trim_end()
        .to_owned();
    for profile in &chosen {
        routes.push_str(&format!("\n# profile {}\n", profile.name));
        routes.push_str(profile.routes);
    }
    out.set(&options::ROUTES, routes.trim_start().to_owned());
    // Which profile set each option, so that a second one can be checked against it.
    let mut set_by: Vec<(&'static str, &'static str, &'static str)> = Vec::new();
    for profile in &chosen {
        for (option, value) in profile.options {
            if args.is_given(*option) {
                continue;
            }
            match set_by.iter().find(|(name, _, _)| *name == option.name()) {
                Some((_, other, v)) if v != value => issues.push(invalid(
                    text,
                    format!(
                        "profiles that agree: {other} and {} both set {} differently (name one, or set {} yourself)",
                        profile.name,
                        option.name(),
                        option.name()
                    ),
                )),
                Some(_) => {}
                None => {
                    set_by.push((option.name(), profile.name, value));
                    out.set(*option, (*value).to_owned());
                }
            }
        }
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(issues)
    }
}

fn invalid(value: &str, expected: String) -> ConfigIssue {
    ConfigIssue::Invalid {
        variable: options::PROFILE.name,
        value: value.to_owned(),
        expected,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    fn config(argv: &[&str]) -> Result<Config, String> {
        let mut all = vec!["idemproxy", "--upstream", "http://127.0.0.1:9"];
        all.extend_from_slice(argv);
        let args = Args::try_parse_from_strings(all, &HashMap::new()).map_err(|e| e.to_string())?;
        Config::from_args(&args).map_err(|e| e.to_string())
    }

    #[test]
    fn every_profile_expands_into_a_valid_configuration() {
        for profile in PROFILES {
            let config = config(&["--profile", profile.name])
                .unwrap_or_else(|e| panic!("profile {}: {e}", profile.name));
            assert_eq!(
                config.routes.len(),
                profile.routes.lines().count(),
                "profile {}",
                profile.name
            );
            for (option, value) in profile.options {
                let line = format!("{}={}", option.name(), value);
                let shown = config.render();
                // Header values are redacted in the rendering: compare names only.
                if option.name() != options::HEARTBEAT_SET_HEADERS.name {
                    assert!(
                        shown.contains(&line),
                        "profile {}: no {line:?} in\n{shown}",
                        profile.name
                    );
                }
            }
        }
    }

    #[test]
    fn the_users_routes_come_first_and_their_options_win() {
        let config = config(&[
            "--profile",
            "etcd",
            "--routes",
            "POST /v3/lease/grant retry=off",
            "--heartbeat-alive-field",
            "result.ID",
        ])
        .unwrap();
        let first = config.routes.get(0).unwrap();
        assert_eq!(first.to_string(), "POST /v3/lease/grant retry=off");
        assert!(
            config
                .render()
                .contains("IDEMPROXY_HEARTBEAT_ALIVE_FIELD=result.ID\n")
        );
        assert!(
            config
                .render()
                .contains("IDEMPROXY_HEARTBEAT=POST /v3/lease/keepalive\n")
        );
    }

    #[test]
    fn unknown_and_conflicting_profiles_are_refused_with_the_names() {
        let e = config(&["--profile", "etcd,cosmos"]).unwrap_err();
        assert!(e.contains("IDEMPROXY_PROFILE"), "{e}");
        assert!(e.contains("\"cosmos\" is none"), "{e}");
        assert!(e.contains("session-api"), "{e}");
        let e = config(&["--profile", "mcp,etcd"]).unwrap_err();
        assert!(e.contains("IDEMPROXY_HEARTBEAT_BODY"), "{e}");
        // Setting the contested option yourself settles it.
        assert!(config(&["--profile", "mcp,etcd", "--heartbeat-body", "{}"]).is_ok());
        // Empty and repeated names are fine.
        assert!(config(&["--profile", " etcd,,etcd "]).is_ok());
        assert!(config(&["--profile", ""]).is_ok());
    }
}
