//! The `http:` key of the config file: where the page and `/metrics` are
//! served, who may see them, and whether actions are allowed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `http:` as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHttp {
    listen: Option<String>,
    #[serde(default)]
    read_only: bool,
    auth: Option<FileAuth>,
}

/// `http.auth:` as written: a token file, or a user and a bcrypt hash.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    token_file: Option<PathBuf>,
    user: Option<String>,
    password_hash: Option<String>,
}

/// The resolved `http:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Http {
    /// Where the daemon listens (`None`: `taskrunner-cli web` only).
    pub listen: Option<SocketAddr>,
    pub read_only: bool,
    pub auth: Option<Auth>,
}

/// Who may use the page (HTTP Basic, or a bearer token).
#[derive(Debug, Clone, PartialEq)]
pub enum Auth {
    /// The token is read from this file at start (its first line).
    TokenFile(PathBuf),
    /// A user and a bcrypt hash of their password (`htpasswd -nbB`).
    Password { user: String, hash: String },
}

impl FileHttp {
    /// Validates; errors name the key (the caller adds the file).
    pub fn resolve(self, dir: &Path) -> Result<Http, String> {
        let listen = match &self.listen {
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                format!("http.listen: `{text}` is not an address and port such as 127.0.0.1:8080")
            })?),
            None => None,
        };
        let auth = match self.auth {
            None => None,
            Some(FileAuth {
                token_file: Some(file),
                user: None,
                password_hash: None,
            }) => Some(Auth::TokenFile(dir.join(file))),
            Some(FileAuth {
                token_file: None,
                user: Some(user),
                password_hash: Some(hash),
            }) => {
                if bcrypt::verify("", &hash).is_err() {
                    return Err("http.auth.password_hash: not a bcrypt hash ($2b$…)".into());
                }
                Some(Auth::Password { user, hash })
            }
            Some(_) => {
                return Err("http.auth: give either token_file, or user and password_hash".into())
            }
        };
        Ok(Http {
            listen,
            read_only: self.read_only,
            auth,
        })
    }
}
