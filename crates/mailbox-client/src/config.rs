//! Client configuration: which DCs exist and how to reach them.
//!
//! Looked up, first match wins: `--config`, `$MAILBOX_CONFIG`,
//! `.mailbox/client.toml` in the current directory or any parent (what
//! `make run` writes), `$HOME/.config/mailbox/client.toml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ClientError;

/// Client configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClientConfig {
    /// DC used when `--dc` is not given.
    pub default_dc: Option<String>,
    /// Every DC and its endpoints.
    pub dcs: BTreeMap<String, DcEndpoints>,
}

/// How to reach one DC.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct DcEndpoints {
    /// `host:port` of the DC's nodes, tried in order.
    pub endpoints: Vec<String>,
}

impl ClientConfig {
    /// Loads a config file.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| ClientError::Config(format!("{}: {e}", path.display())))
    }

    /// Finds the config file by the lookup order in the module docs.
    pub fn discover(explicit: Option<&Path>) -> Result<Option<(PathBuf, Self)>, ClientError> {
        if let Some(p) = explicit {
            return Ok(Some((p.to_path_buf(), Self::load(p)?)));
        }
        if let Some(p) = std::env::var_os("MAILBOX_CONFIG") {
            let p = PathBuf::from(p);
            return Ok(Some((p.clone(), Self::load(&p)?)));
        }
        let mut dir = std::env::current_dir().ok();
        while let Some(d) = dir {
            let p = d.join(".mailbox/client.toml");
            if p.is_file() {
                return Ok(Some((p.clone(), Self::load(&p)?)));
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        if let Some(home) = std::env::var_os("HOME") {
            let p = PathBuf::from(home).join(".config/mailbox/client.toml");
            if p.is_file() {
                return Ok(Some((p.clone(), Self::load(&p)?)));
            }
        }
        Ok(None)
    }

    /// Endpoints of `dc`, or of the default DC (or the only one) when `None`.
    pub fn endpoints(&self, dc: Option<&str>) -> Result<Vec<String>, ClientError> {
        let name = match dc.or(self.default_dc.as_deref()) {
            Some(n) => n.to_string(),
            None if self.dcs.len() == 1 => self.dcs.keys().next().cloned().unwrap_or_default(),
            None => {
                return Err(ClientError::Config(
                    "several DCs configured and no default-dc; pass --dc".into(),
                ))
            }
        };
        let dc = self.dcs.get(&name).ok_or_else(|| {
            ClientError::Config(format!(
                "unknown DC {name:?} (known: {:?})",
                self.dcs.keys().collect::<Vec<_>>()
            ))
        })?;
        if dc.endpoints.is_empty() {
            return Err(ClientError::Config(format!("DC {name:?} has no endpoints")));
        }
        Ok(dc.endpoints.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_by_dc() {
        let c: ClientConfig = toml::from_str(
            "default-dc = \"east\"\n[dcs.east]\nendpoints = [\"a:1\"]\n[dcs.west]\nendpoints = [\"b:1\"]\n",
        )
        .unwrap();
        assert_eq!(c.endpoints(None).unwrap(), ["a:1"]);
        assert_eq!(c.endpoints(Some("west")).unwrap(), ["b:1"]);
        assert!(c.endpoints(Some("north")).is_err());
    }
}
