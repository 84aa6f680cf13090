//! `thingsgate connection …`: a solution's connections to external brokers (bridges,
//! DESIGN.md §5, §7), two ways:
//!
//! - offline, `--data DIR`: on a stopped data dir, like `thingsgate solution …` (the store's
//!   lock refuses a running server's dir); changes go through [`Solutions`], checked by
//!   [`ConnectionDoc::compile`] as the API checks them. The server starts them at its next start.
//! - online, `--http URL`: through a running server's HTTP API
//!   (`/api/2/solutions/{id}/connections…`), authenticated with `Authorization: Basic` and a
//!   secret of the solution taken from the environment variable [`SECRET_ENV`] — never from
//!   the command line, where every user of the machine would see it in `ps`. The server
//!   authorizes each request by the solution policy and applies a change at once.
//!
//! A connection's URI holds the password the bridge logs in with: nothing here prints it
//! (documents are shown with [`ConnectionDoc::redacted`], whatever the server sent), and the
//! secret is never part of a message. Every error exits 2 with its message on stderr.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use policy::Timestamp;
use serde_json::{Value, json};

use crate::auth::solution::SolutionId;
use crate::bridge::config::{ConnectionDoc, HIDDEN, redact_uri};
use crate::http_client::{
    self, Api, BaseUrl, REQUEST_TIMEOUT, Refused, SECRET_ENV, secret_from_env, segment,
};
use crate::solution_cmd::DataDir;

/// The largest connection document read from a file.
const MAX_DOCUMENT_BYTES: u64 = 1 << 20;

/// Where the connections are: a stopped data dir or a running server, and whose.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("place").required(true).args(["data", "http"])))]
pub struct Where {
    /// A stopped data dir (the server must not be running on it; it starts the connections
    /// at its next start).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// A running server's HTTP API, e.g. `http://127.0.0.1:8080` (plain HTTP). The request
    /// is authenticated with a secret of the solution taken from the environment variable
    /// THINGSGATE_SECRET — never from the command line, where `ps` would show it.
    #[arg(long, value_name = "URL")]
    pub http: Option<String>,
    /// The solution ID.
    #[arg(long)]
    pub solution: String,
}

/// Where, resolved.
enum Place {
    Offline(PathBuf),
    Online(Server),
}

impl Where {
    fn resolve(&self) -> anyhow::Result<(SolutionId, Place)> {
        let solution = SolutionId::parse(&self.solution)?;
        let place = match (&self.data, &self.http) {
            (Some(data), None) => Place::Offline(data.clone()),
            (None, Some(url)) => Place::Online(Server::new(url, &solution, secret_from_env)?),
            _ => bail!(
                "give either `--data DIR` (a stopped data dir) or `--http URL` (a running server)"
            ),
        };
        Ok((solution, place))
    }
}

fn now() -> Timestamp {
    Timestamp::from(std::time::SystemTime::now())
}

// --- the commands -------------------------------------------------------------------------------

/// `connection create`: the document in `file` (`-`: stdin), refused if its ID exists.
pub fn create(at: &Where, file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let (solution, place) = at.resolve()?;
    let (value, from) = read_document(file)?;
    let id = match value.get("id") {
        Some(Value::String(id)) => id.clone(),
        Some(_) => bail!("{from}: `id` must be a string"),
        None => {
            bail!("{from}: the connection needs an `id` (1 to 64 letters, digits, `-`, `_` or `.`)")
        }
    };
    let shown_uri = match place {
        Place::Offline(data) => {
            let doc = serde_json::from_value::<ConnectionDoc>(value)
                .map_err(|e| anyhow!("{from}: invalid connection: {e}"))?;
            let raw_uri = doc.uri.clone();
            doc.compile().map_err(|e| {
                anyhow!(
                    "{from}: invalid connection: {}",
                    hide_password(&e.to_string(), &raw_uri)
                )
            })?;
            let dir = DataDir::open(&data, false)?;
            let stored = dir
                .solutions
                .put_connection(&*dir.store, &solution, doc, true, now());
            dir.close()?;
            stored.map_err(|e| {
                anyhow!(
                    "connection `{id}` not created: {}",
                    hide_password(&e.to_string(), &raw_uri)
                )
            })?;
            shown_uri(&raw_uri)
        }
        Place::Online(server) => {
            let body = serde_json::to_vec(&value)?;
            let raw_uri = value.get("uri").and_then(Value::as_str).unwrap_or_default();
            let answer = server
                .call(hyper::Method::POST, &[], Some(body))
                .map_err(|e| anyhow!("{}", hide_password(&format!("{e:#}"), raw_uri)))?;
            let created = answer
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or(&id)
                .to_owned();
            if created != id {
                bail!("the server created connection `{created}`, not `{id}`");
            }
            value
                .get("uri")
                .and_then(Value::as_str)
                .map(shown_uri)
                .unwrap_or_default()
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(
            out,
            "{}",
            json!({"solutionId": solution.as_str(), "id": id})
        )?;
    } else {
        writeln!(
            out,
            "created connection {id} of solution {solution} ({shown_uri})"
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `connection list`: a table, or (`--json`) the documents with their passwords hidden.
pub fn list(at: &Where, json: bool) -> anyhow::Result<ExitCode> {
    let (solution, place) = at.resolve()?;
    let docs: Vec<Value> = match place {
        Place::Offline(data) => {
            let dir = DataDir::open(&data, false)?;
            let found = dir.solutions.get(solution.as_str());
            dir.close()?;
            let found = found.ok_or_else(|| anyhow!("there is no solution `{solution}`"))?;
            found
                .connections
                .iter()
                .map(|c| serde_json::to_value(c.redacted()))
                .collect::<Result<_, _>>()?
        }
        Place::Online(server) => match server.call(hyper::Method::GET, &[], None)? {
            Value::Array(docs) => docs,
            other => bail!("the server answered with something other than a list: {other}"),
        },
    };
    // Whatever the server sent: nothing printed shows a password.
    let docs: Vec<Value> = docs.into_iter().map(redacted_value).collect();
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&docs)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if docs.is_empty() {
        writeln!(out, "solution {solution} has no connections")?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<24} {:<9} {:<7} {:>7} {:>7}  URI",
        "CONNECTION", "TYPE", "STATUS", "SOURCES", "TARGETS"
    )?;
    for doc in &docs {
        let text = |k: &str| doc.get(k).and_then(Value::as_str).unwrap_or("-");
        let count = |k: &str| doc.get(k).and_then(Value::as_array).map_or(0, Vec::len);
        writeln!(
            out,
            "{:<24} {:<9} {:<7} {:>7} {:>7}  {}",
            text("id"),
            text("connectionType"),
            doc.get("connectionStatus")
                .and_then(Value::as_str)
                .unwrap_or("open"),
            count("sources"),
            count("targets"),
            text("uri"),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `connection delete --id X`.
pub fn delete(at: &Where, id: &str) -> anyhow::Result<ExitCode> {
    let (solution, place) = at.resolve()?;
    match place {
        Place::Offline(data) => {
            let dir = DataDir::open(&data, false)?;
            let deleted = dir
                .solutions
                .delete_connection(&*dir.store, &solution, id, now());
            dir.close()?;
            deleted?;
        }
        Place::Online(server) => {
            server.call(hyper::Method::DELETE, &[id], None)?;
        }
    }
    writeln!(
        std::io::stdout().lock(),
        "deleted connection {id} of solution {solution}"
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `connection status --http URL [--id X]`: what the running server knows of its connections.
pub fn status(at: &Where, id: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    if at.data.is_some() {
        bail!(
            "a connection's state is known to the running server only: use `--http URL` \
             (with {SECRET_ENV}) instead of `--data`"
        );
    }
    let (_, place) = at.resolve()?;
    let Place::Online(server) = place else {
        bail!("`connection status` needs `--http URL`");
    };
    let ids: Vec<String> = match id {
        Some(id) => vec![id.to_owned()],
        None => match server.call(hyper::Method::GET, &[], None)? {
            Value::Array(docs) => docs
                .iter()
                .filter_map(|d| d.get("id").and_then(Value::as_str).map(str::to_owned))
                .collect(),
            other => bail!("the server answered with something other than a list: {other}"),
        },
    };
    let mut statuses = Vec::with_capacity(ids.len());
    for connection in &ids {
        match server.call(hyper::Method::GET, &[connection, "status"], None) {
            Ok(status) => statuses.push(status),
            // Deleted between the list and now: it has no status any more.
            Err(e)
                if id.is_none() && e.downcast_ref::<Refused>().is_some_and(|r| r.status == 404) => {
            }
            Err(e) => return Err(e),
        }
    }
    let mut out = std::io::stdout().lock();
    if json {
        let shown = match (id, statuses.pop()) {
            (Some(_), Some(one)) => one,
            (_, last) => Value::Array(statuses.into_iter().chain(last).collect()),
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&shown)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if statuses.is_empty() {
        writeln!(out, "solution {} has no connections", server.api.solution())?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<24} {:<10} {:<24} {:>20}  LAST ERROR",
        "CONNECTION", "STATE", "SINCE", "IN/OUT/DENIED/FAILED"
    )?;
    for s in &statuses {
        let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("-");
        let counter = |k: &str| {
            s.get("counters")
                .and_then(|c| c.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        let counters = format!(
            "{}/{}/{}/{}",
            counter("in"),
            counter("out"),
            counter("denied"),
            counter("failed")
        );
        writeln!(
            out,
            "{:<24} {:<10} {:<24} {:>20}  {}",
            text("id"),
            text("status"),
            text("since"),
            counters,
            text("lastError"),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The JSON object in `file` (`-`: stdin), and how to name it in messages.
fn read_document(file: &Path) -> anyhow::Result<(Value, String)> {
    let (from, text) = if file == Path::new("-") {
        let mut text = Vec::new();
        std::io::stdin()
            .take(MAX_DOCUMENT_BYTES + 1)
            .read_to_end(&mut text)
            .context("cannot read the connection from stdin")?;
        ("stdin".to_owned(), text)
    } else {
        let from = format!("`{}`", file.display());
        let mut text = Vec::new();
        std::fs::File::open(file)
            .and_then(|f| f.take(MAX_DOCUMENT_BYTES + 1).read_to_end(&mut text))
            .with_context(|| format!("cannot read the connection file {from}"))?;
        (from, text)
    };
    if text.len() as u64 > MAX_DOCUMENT_BYTES {
        bail!("{from}: a connection document has at most {MAX_DOCUMENT_BYTES} bytes");
    }
    let value: Value =
        serde_json::from_slice(&text).map_err(|e| anyhow!("{from} is not JSON: {e}"))?;
    if !value.is_object() {
        bail!("{from}: a connection is a JSON object");
    }
    Ok((value, from))
}

/// `text` with the password of `uri` (if any) replaced by `***`. The checks quote a URI they
/// refuse with its password hidden, but a password with an unencoded `/` ends the URI's
/// authority early and is quoted as it is: whatever a message says, it is not printed.
fn hide_password(text: &str, uri: &str) -> String {
    let Some((_, rest)) = uri.split_once("://") else {
        return text.to_owned();
    };
    let Some(at) = rest.rfind('@') else {
        return text.to_owned();
    };
    let userinfo = rest.get(..at).unwrap_or_default();
    match userinfo.split_once(':') {
        Some((_, password)) if !password.is_empty() && password != HIDDEN => {
            text.replace(&format!(":{password}@"), &format!(":{HIDDEN}@"))
        }
        _ => text.to_owned(),
    }
}

/// `uri` as shown: its password (if any) as `***`.
fn shown_uri(uri: &str) -> String {
    hide_password(&redact_uri(uri), uri)
}

/// `doc` with its `uri`'s password (if any) shown as `***`.
fn redacted_value(mut doc: Value) -> Value {
    if let Some(uri) = doc.get_mut("uri")
        && let Some(text) = uri.as_str()
    {
        *uri = Value::String(shown_uri(text));
    }
    doc
}

// --- the HTTP client ---------------------------------------------------------------------------

/// A running server's connection API for one solution ([`Api`] under
/// `/api/2/solutions/{id}/connections`).
#[derive(Debug)]
struct Server {
    api: Api,
}

impl Server {
    fn new(
        url: &str,
        solution: &SolutionId,
        secret: impl FnOnce(&SolutionId) -> anyhow::Result<String>,
    ) -> anyhow::Result<Self> {
        let base = BaseUrl::parse(url, "thingsgate connection")?;
        Ok(Server {
            api: Api::new(base, solution, secret)?,
        })
    }

    /// The URL of `…/connections[/<segments>…]`.
    fn url(&self, segments: &[&str]) -> String {
        let mut url = format!(
            "{}/api/2/solutions/{}/connections",
            self.api.base(),
            segment(self.api.solution().as_str())
        );
        for s in segments {
            url.push('/');
            url.push_str(&segment(s));
        }
        url
    }

    /// `method` on `…/connections[/<segments>…]`: the answer's JSON (`null` for 204), or an
    /// error saying what the server refused, or why it could not be asked.
    fn call(
        &self,
        method: hyper::Method,
        segments: &[&str],
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Value> {
        let url = self.url(segments);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the HTTP client")?;
        let (status, bytes) = runtime.block_on(async {
            let client = http_client::client(0);
            tokio::time::timeout(
                REQUEST_TIMEOUT,
                self.api.send(&client, method.clone(), &url, body),
            )
            .await
            .map_err(|_| {
                anyhow!(
                    "no answer from {} within {REQUEST_TIMEOUT:?} ({method} {url})",
                    self.api.base()
                )
            })?
        })?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes)
                .map_err(|e| anyhow!("{method} {url}: the server's answer is not JSON: {e}"));
        }
        Err(anyhow::Error::new(self.api.refusal(status, &bytes)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn server(url: &str) -> anyhow::Result<Server> {
        let id = SolutionId::parse("acme").unwrap();
        Server::new(url, &id, |_| Ok("s3cr3t".to_owned()))
    }

    #[test]
    fn connection_urls_are_under_the_solution() {
        let s = server("127.0.0.1:8080/").unwrap();
        assert_eq!(
            s.url(&["a b", "status"]),
            "http://127.0.0.1:8080/api/2/solutions/acme/connections/a%20b/status"
        );
        assert!(!format!("{s:?}").contains("Basic"));
    }

    #[test]
    fn messages_never_show_the_password_of_the_uri_they_quote() {
        let uri = "amqp://u:pa/ss@h:5672/%2f";
        assert_eq!(
            hide_password(&format!("bad port (in `{uri}`)"), uri),
            "bad port (in `amqp://u:***@h:5672/%2f`)"
        );
        assert_eq!(
            hide_password("no password here", "amqp://u@h"),
            "no password here"
        );
    }

    #[test]
    fn listed_documents_never_show_a_password() {
        let doc = redacted_value(json!({"id": "x", "uri": "amqp://u:pw@h:5672/%2f"}));
        assert_eq!(doc["uri"], "amqp://u:***@h:5672/%2f");
        // A password `1/x` makes the URI read as host `admin`, port 1: still hidden.
        let doc = redacted_value(json!({"uri": "amqp://admin:1/x@rabbit:5672/%2f"}));
        assert_eq!(doc["uri"], "amqp://admin:***@rabbit:5672/%2f");
    }
}
