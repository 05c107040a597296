//! The `http:` key of the config file: where the page and `/metrics` are
//! served, who may see them, and whether actions are allowed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The highest bcrypt cost a `password_hash` may have: each login checks
/// it with 2^cost rounds, about 1 s at cost 14 here (0.25 s at 12), and a
/// cost of 31 would keep the start (and each failed login) a day and a half.
const MAX_BCRYPT_COST: u32 = 14;

/// `http:` as written in the file.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileHttp {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    #[serde(default)]
    read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth: Option<FileAuth>,
}

/// `http.auth:` as written: a token file, or a user and a bcrypt hash.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    #[serde(skip_serializing_if = "Option::is_none")]
    token_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    password_hash: Option<String>,
}

/// The resolved `http:` settings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Http {
    /// Where the daemon listens (`None`: `taskrunner-cli web` only).
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) read_only: bool,
    pub(crate) auth: Option<Auth>,
}

/// Who may use the page (HTTP Basic, or a bearer token).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Auth {
    /// The token is read from this file at start (its first line).
    TokenFile(PathBuf),
    /// A user and a bcrypt hash of their password (`htpasswd -nbB`).
    Password { user: String, hash: String },
}

impl Http {
    /// The settings as a config file writes them (`config check`).
    pub(crate) fn as_written(&self) -> FileHttp {
        let auth = self.auth.as_ref().map(|auth| match auth {
            Auth::TokenFile(file) => FileAuth {
                token_file: Some(file.clone()),
                user: None,
                password_hash: None,
            },
            Auth::Password { user, hash } => FileAuth {
                token_file: None,
                user: Some(user.clone()),
                password_hash: Some(hash.clone()),
            },
        });
        FileHttp {
            listen: self.listen.map(|address| address.to_string()),
            read_only: self.read_only,
            auth,
        }
    }
}

impl FileHttp {
    /// Validates; errors name the key (the caller adds the file).
    pub(crate) fn resolve(self, dir: &Path) -> Result<Http, String> {
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
                // The cost first: the check below, and each login, runs
                // 2^cost rounds (cost 31: about a day and a half here).
                let Ok(parts) = hash.parse::<bcrypt::HashParts>() else {
                    return Err("http.auth.password_hash: not a bcrypt hash ($2b$…)".into());
                };
                if parts.get_cost() > MAX_BCRYPT_COST {
                    return Err(format!(
                        "http.auth.password_hash: bcrypt cost {} is more than {MAX_BCRYPT_COST}: each login would take minutes to hours (make the hash with cost 10 to 12)",
                        parts.get_cost()
                    ));
                }
                match bcrypt::verify("", &hash) {
                    Err(_) => {
                        return Err("http.auth.password_hash: not a bcrypt hash ($2b$…)".into())
                    }
                    // Anyone would log in with the user's name alone.
                    Ok(true) => return Err(
                        "http.auth.password_hash: the hash of an empty password; hash a real one"
                            .into(),
                    ),
                    Ok(false) => {}
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
