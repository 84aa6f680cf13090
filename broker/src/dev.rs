//! `serve --dev`: a demo solution, a local JWT issuer with a generated key, and ready-to-paste
//! `mosquitto_sub`/`mosquitto_pub` lines. Development only: it prints a secret and a token.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;
use serde_json::json;

use crate::auth::solution::{SolutionId, default_policy};
use crate::config::Config;
use crate::solution_cmd::DataDir;
use crate::token_cmd::{self, SigningKey, TokenArgs};

/// The demo namespace.
pub const DEMO_NAMESPACE: &str = "org.example.demo";
/// The dev issuer's `iss`.
pub const DEV_ISSUER: &str = "https://dev.thingsgate.local";
/// The subject the dev token stands for (`dev:developer`).
pub const DEV_SUBJECT: &str = "developer";

/// What `--dev` prepared, for the instructions.
#[derive(Debug)]
pub struct DevSetup {
    pub solution: SolutionId,
    pub secret: String,
    pub token: String,
    pub key_file: std::path::PathBuf,
}

/// The solution ID `serve --dev` creates.
fn demo_solution_id() -> anyhow::Result<SolutionId> {
    Ok(SolutionId::parse("demo")?)
}

fn now() -> policy::Timestamp {
    crate::core::now()
}

/// Creates (or refreshes) the demo solution and the dev issuer in `data`.
pub(crate) fn prepare(dir: &DataDir, data: &Path, config: &mut Config) -> anyhow::Result<DevSetup> {
    let id = demo_solution_id()?;
    let secret = match dir.solutions.get(id.as_str()) {
        Some(_) => dir
            .solutions
            .add_secret(&dir.store, &id, now())?
            .secret
            .expose()
            .to_owned(),
        None => dir
            .solutions
            .create(
                &dir.store,
                Some(id.clone()),
                &[DEMO_NAMESPACE.to_owned()],
                now(),
            )?
            .secret
            .expose()
            .to_owned(),
    };
    // The demo policy: the default one, plus the dev issuer's developer on every topic.
    let mut value = policy::policy_to_value(&default_policy(&id)?);
    if let Some(entries) = value.get_mut("entries").and_then(|e| e.as_object_mut()) {
        entries.insert(
            "developer".to_owned(),
            json!({
                "subjects": {format!("dev:{DEV_SUBJECT}"): {"type": "the dev token of `serve --dev`"}},
                "resources": {
                    "topic:/": {"grant": ["READ", "WRITE"], "revoke": []},
                    "thing:/": {"grant": ["CREATE"], "revoke": []},
                    "policy:/": {"grant": ["CREATE"], "revoke": []}
                }
            }),
        );
    }
    let policy = policy::policy_from_value(&value)?;
    dir.solutions.set_policy(&dir.store, &id, policy, now())?;

    let dev_dir = data.join("dev");
    std::fs::create_dir_all(&dev_dir)
        .with_context(|| format!("cannot create `{}`", dev_dir.display()))?;
    let key_file = dev_dir.join("dev-key.pem");
    if !key_file.exists() {
        let pem = token_cmd::generate_dev_key()?;
        std::fs::write(&key_file, pem)
            .with_context(|| format!("cannot write `{}`", key_file.display()))?;
    }
    let pem = std::fs::read_to_string(&key_file)
        .with_context(|| format!("cannot read `{}`", key_file.display()))?;
    let jwks = token_cmd::jwks_for_private_key(&pem)?;
    let jwks_file = dev_dir.join("jwks.json");
    std::fs::write(&jwks_file, serde_json::to_vec_pretty(&jwks)?)
        .with_context(|| format!("cannot write `{}`", jwks_file.display()))?;
    let issuer_toml = format!(
        "[[issuer]]\nkey = \"dev\"\nissuer = \"{DEV_ISSUER}\"\naudiences = [\"thingsgate\"]\n\
         jwks_file = \"jwks.json\"\nsolution_claim = \"solution_id\"\n"
    );
    let dev_config = Config::parse(&issuer_toml, &dev_dir.join("dev.toml"), Vec::new())?;
    config.issuers.retain(|i| i.key != "dev");
    config.issuers.extend(dev_config.issuers);

    let args = TokenArgs {
        key: key_file.clone(),
        iss: DEV_ISSUER.to_owned(),
        sub: DEV_SUBJECT.to_owned(),
        aud: vec!["thingsgate".to_owned()],
        claims: vec![format!("solution_id={id}")],
        ttl: "24h".to_owned(),
        kid: None,
    };
    let claims = token_cmd::token_claims(&args, SystemTime::now())?;
    let token = SigningKey::from_pkcs8_pem(&pem)?.sign(&claims, None)?;
    Ok(DevSetup {
        solution: id,
        secret,
        token,
        key_file,
    })
}

/// Prints the client commands that work against this server.
pub fn print_instructions(
    out: &mut impl Write,
    dev: &DevSetup,
    address: SocketAddr,
) -> std::io::Result<()> {
    let host = address.ip();
    let port = address.port();
    let id = &dev.solution;
    writeln!(
        out,
        "dev mode: solution `{id}` (namespace {DEMO_NAMESPACE}); dev issuer `{DEV_ISSUER}` (key {})",
        dev.key_file.display()
    )?;
    writeln!(out, "# subscribe with the solution secret (basic auth):")?;
    writeln!(
        out,
        "mosquitto_sub -h {host} -p {port} -V mqttv5 -i dev-sub -u {id} -P '{}' -t 'demo/#' -v",
        dev.secret
    )?;
    writeln!(
        out,
        "# publish with the dev JWT (solution from its `solution_id` claim):"
    )?;
    writeln!(
        out,
        "mosquitto_pub -h {host} -p {port} -V mqttv5 -i dev-pub -u dev -P '{}' -t demo/hello -m 'hello from thingsgate'",
        dev.token
    )?;
    writeln!(
        out,
        "# mint another token: thingsgate token --key {} --iss {DEV_ISSUER} --sub {DEV_SUBJECT} --aud thingsgate --claim solution_id={id}",
        dev.key_file.display()
    )?;
    Ok(())
}
