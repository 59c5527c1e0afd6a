//! Redis as the metadata store, as Mooncake's `redis://host:port` plugin: `GET`, `SET` and `DEL`
//! of the JSON entries; `AUTH` from `MC_REDIS_USERNAME` / `MC_REDIS_PASSWORD` and `SELECT` from
//! `MC_REDIS_DB_INDEX` (0-255) unless the address names its own.
//!
//! Redis keeps no per-key revision: a swap compares the whole value in a Lua script (sent with
//! `EVAL`), listing is `SCAN` and `MGET`, expiry is `SET ... PX`.
//!
//! One multiplexed connection, made on first use and remade after a failure.

use std::collections::BTreeSet;
use std::time::Duration;

use mooncake_common::{Error, ErrorKind, Result};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use tokio::sync::OnceCell;

use crate::store::{BoxFuture, MetadataStore, Revisioned};

/// Mooncake's timeouts for one metadata request, and for connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(3000);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

/// Client of a Redis server holding the metadata.
pub struct RedisStore {
    address: String,
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
}

impl RedisStore {
    /// A client for `conn` (`redis://host:port`, optionally with `user:password@` and `/db`);
    /// credentials and database index come from the environment otherwise.
    pub fn new(conn: &str) -> Result<Self> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let url = with_settings(
            conn,
            env("MC_REDIS_USERNAME"),
            env("MC_REDIS_PASSWORD"),
            env("MC_REDIS_DB_INDEX"),
        )?;
        let client = redis::Client::open(url.as_str())
            .map_err(|e| Error::invalid(format!("Redis metadata address '{conn}': {e}")))?;
        Ok(Self {
            address: conn.to_owned(),
            client,
            connection: OnceCell::new(),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(REQUEST_TIMEOUT))
            .set_number_of_retries(1);
        self.connection
            .get_or_try_init(|| self.client.get_connection_manager_with_config(config))
            .await
            .cloned()
            .map_err(|e| self.failed("connect", e))
    }

    fn failed(&self, what: &str, e: redis::RedisError) -> Error {
        Error::new(
            ErrorKind::Metadata,
            format!("Redis {what} at {}: {e}", self.address),
        )
        .with_source(e)
    }
}

/// `conn` with the credentials and database index it lacks filled in from the settings.
fn with_settings(
    conn: &str,
    username: Option<String>,
    password: Option<String>,
    db_index: Option<String>,
) -> Result<String> {
    let rest = conn
        .strip_prefix("redis://")
        .ok_or_else(|| Error::invalid(format!("'{conn}' is not a redis:// address")))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut url = String::from("redis://");
    if !authority.contains('@') && (username.is_some() || password.is_some()) {
        let escape = |s: &Option<String>| {
            s.as_deref()
                .map(|s| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string())
                .unwrap_or_default()
        };
        url.push_str(&format!("{}:{}@", escape(&username), escape(&password)));
    }
    url.push_str(authority);
    match (path, db_index) {
        ("", Some(index)) => {
            let db: u8 = index.parse().map_err(|_| {
                Error::invalid(format!("MC_REDIS_DB_INDEX must be 0-255, not '{index}'"))
            })?;
            url.push_str(&format!("/{db}"));
        }
        ("", None) => {}
        (path, _) => url.push_str(&format!("/{path}")),
    }
    Ok(url)
}

impl MetadataStore for RedisStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            let mut connection = self.connection().await?;
            connection
                .get::<_, Option<String>>(key)
                .await
                .map_err(|e| self.failed("GET", e))
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut connection = self.connection().await?;
            connection
                .set::<_, _, ()>(key, value)
                .await
                .map_err(|e| self.failed("SET", e))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut connection = self.connection().await?;
            connection
                .del::<_, ()>(key)
                .await
                .map_err(|e| self.failed("DEL", e))
        })
    }

    fn get_revisioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Revisioned>>> {
        Box::pin(async move {
            Ok(self
                .get(key)
                .await?
                .map(|value| Revisioned { value, revision: 0 }))
        })
    }

    /// Compares whole values: a value written back unchanged in between (A, B, A) passes.
    fn swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a Revisioned>,
        new: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let mut connection = self.connection().await?;
            let mut eval = redis::cmd("EVAL");
            eval.arg(SWAP_SCRIPT).arg(1).arg(key);
            match expected {
                None => eval.arg("absent").arg(""),
                Some(read) => eval.arg("equal").arg(&read.value),
            };
            match new {
                None => eval.arg("delete").arg(""),
                Some(value) => eval.arg("set").arg(value),
            };
            let swapped: i64 = eval
                .query_async(&mut connection)
                .await
                .map_err(|e| self.failed("EVAL (swap)", e))?;
            Ok(swapped == 1)
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<(String, String)>>> {
        Box::pin(async move {
            let mut connection = self.connection().await?;
            let pattern = format!("{}*", glob_escape(prefix));
            // SCAN may name a key more than once.
            let mut keys = BTreeSet::new();
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(LIST_BATCH)
                    .query_async(&mut connection)
                    .await
                    .map_err(|e| self.failed("SCAN", e))?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            let keys: Vec<String> = keys.into_iter().collect();
            let mut entries = Vec::with_capacity(keys.len());
            for chunk in keys.chunks(LIST_BATCH) {
                let values: Vec<Option<String>> = redis::cmd("MGET")
                    .arg(chunk)
                    .query_async(&mut connection)
                    .await
                    .map_err(|e| self.failed("MGET", e))?;
                // A key deleted (or expired) since the scan reads as nil: it is simply gone.
                entries.extend(
                    chunk
                        .iter()
                        .zip(values)
                        .filter_map(|(key, value)| Some((key.clone(), value?))),
                );
            }
            Ok(entries)
        })
    }

    fn put_expiring<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let mut connection = self.connection().await?;
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(millis)
                .query_async::<()>(&mut connection)
                .await
                .map_err(|e| self.failed("SET PX", e))
        })
    }
}

/// Keys a SCAN step looks at, and keys one MGET reads.
const LIST_BATCH: usize = 1000;

/// Compare-and-swap on the whole value: KEYS[1] is the key; ARGV is `absent` or `equal` and
/// the value read, then `set` and the new value or `delete`. 1 when it swapped.
const SWAP_SCRIPT: &str = r#"
local current = redis.call('GET', KEYS[1])
if ARGV[1] == 'absent' then
  if current then return 0 end
elseif current ~= ARGV[2] then
  return 0
end
if ARGV[3] == 'set' then
  redis.call('SET', KEYS[1], ARGV[4])
else
  redis.call('DEL', KEYS[1])
end
return 1
"#;

/// `text` as a SCAN pattern that matches only itself.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_fill_what_the_address_lacks() {
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(
            with_settings("redis://10.0.0.1:6379", None, None, None).unwrap(),
            "redis://10.0.0.1:6379"
        );
        assert_eq!(
            with_settings("redis://h:6379", some("me"), some("p@ss:w/rd"), some("3")).unwrap(),
            "redis://me:p%40ss%3Aw%2Frd@h:6379/3"
        );
        assert_eq!(
            with_settings("redis://h:6379", None, some("pw"), None).unwrap(),
            "redis://:pw@h:6379"
        );
        assert_eq!(
            with_settings("redis://u:v@h:6379/2", some("me"), some("pw"), some("5")).unwrap(),
            "redis://u:v@h:6379/2",
            "the address's own settings win"
        );
        assert_eq!(
            with_settings("redis://h:6379", None, None, some("256"))
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidArgument
        );
        assert!(RedisStore::new("redis://h:notaport").is_err());
    }

    #[test]
    fn scan_patterns_match_the_prefix_literally() {
        assert_eq!(glob_escape("mooncake/ram/"), "mooncake/ram/");
        assert_eq!(glob_escape(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
    }
}
