//! `serve --dev`: what Thingsgate is for, ready to try in a few minutes. In the data dir (a
//! temporary one unless `--data` is given) it prepares:
//!
//! - the solution `demo`, owning the namespace `org.example.demo`, with a fresh secret;
//! - a local JWT issuer `dev` (a generated EC key, its JWKS file) whose tokens name their
//!   solution in the `solution_id` claim, so they need no API token;
//! - the thing `org.example.demo:lamp` and its policy: the lamp itself (`dev:lamp`) may read
//!   and change its `power` feature and nothing else; Alice (`dev:alice`, a technician) reads
//!   everything but the `secret` attribute; Bob (`dev:bob`, a dashboard) reads only the `power`
//!   feature; the developer (`dev:developer`) owns it. Written once: when the data dir already
//!   has them they are kept as they are;
//! - a dev token (24 h) for each of those four subjects.
//!
//! and prints ready-to-paste commands: the tokens as shell variables, an MQTT subscription to
//! the lamp's events as Alice sees them, the lamp's allowed write and its denied one (MQTT 5
//! PUBACK reason 135, not authorized), `curl` reads of the same thing over HTTP by Alice and by
//! Bob, a live policy change by the developer, and the plain-topic commands (solution secret,
//! developer token). Development only: it
//! prints a secret and tokens.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;
use serde_json::{Value, json};
use twin::apply::{Applied, apply_policy_command, apply_thing_command};
use twin::command::{Action, CommandHeaders, PolicyCommand, ThingCommand};
use twin::path::ThingPath;
use twin::store::{TwinStore, TwinStoreExt, WriteError};
use twin::thing::Limits;
use twin::{DittoError, EntityKey, EntityKind, PolicyId, ThingId};

use crate::auth::solution::{SolutionId, default_policy};
use crate::config::Config;
use crate::solution_cmd::DataDir;
use crate::token_cmd::{self, SigningKey, TokenArgs};

/// The demo namespace.
pub const DEMO_NAMESPACE: &str = "org.example.demo";
/// The dev issuer's `iss`.
pub const DEV_ISSUER: &str = "https://dev.thingsgate.local";
/// The subject the developer's token stands for (`dev:developer`): owner of the demo thing and
/// of every plain topic.
pub const DEV_SUBJECT: &str = "developer";
/// The demo thing, which is also its policy's ID.
pub const DEMO_THING: &str = "org.example.demo:lamp";
/// The lamp's own subject (`dev:lamp`): it may change its `power` feature only.
pub const DEVICE_SUBJECT: &str = "lamp";
/// A technician (`dev:alice`): reads the whole lamp except its `secret` attribute.
pub const ALICE_SUBJECT: &str = "alice";
/// A dashboard user (`dev:bob`): reads only the lamp's `power` feature.
pub const BOB_SUBJECT: &str = "bob";
/// Where `serve --dev` listens for HTTP unless `--http` is given (a free port if it is taken).
pub const DEV_HTTP: &str = "127.0.0.1:8080";
/// The AMQP listener of `serve --dev` (5672 is RabbitMQ's), or a free port if taken.
pub const DEV_AMQP: &str = "127.0.0.1:5673";

/// What `--dev` prepared, for the instructions.
#[derive(Debug)]
pub struct DevSetup {
    pub solution: SolutionId,
    pub secret: String,
    /// The developer's token (`dev:developer`).
    pub token: String,
    /// The lamp's token (`dev:lamp`).
    pub device_token: String,
    /// Alice's token (`dev:alice`).
    pub alice_token: String,
    /// Bob's token (`dev:bob`).
    pub bob_token: String,
    pub key_file: std::path::PathBuf,
    /// The demo thing and policy were written now (`false`: the data dir had them already).
    pub demo_created: bool,
}

/// The solution ID `serve --dev` creates.
fn demo_solution_id() -> anyhow::Result<SolutionId> {
    Ok(SolutionId::parse("demo")?)
}

fn now() -> policy::Timestamp {
    crate::core::now()
}

/// The demo thing's policy: who may do what with the lamp.
fn demo_policy() -> Value {
    let all = json!({"grant": ["READ", "WRITE"], "revoke": []});
    let subject = |sub: &str, what: &str| json!({format!("dev:{sub}"): {"type": what}});
    json!({
        "policyId": DEMO_THING,
        "entries": {
            "owner": {
                "subjects": subject(DEV_SUBJECT, "the developer of `serve --dev`"),
                "resources": {"thing:/": all, "policy:/": all, "message:/": all}
            },
            "device": {
                "subjects": subject(DEVICE_SUBJECT, "the lamp itself"),
                "resources": {"thing:/features/power": all}
            },
            "technician": {
                "subjects": subject(ALICE_SUBJECT, "Alice, a technician: all but the secret"),
                "resources": {
                    "thing:/": {"grant": ["READ"], "revoke": []},
                    "thing:/attributes/secret": {"grant": [], "revoke": ["READ"]}
                }
            },
            "dashboard": {
                "subjects": subject(BOB_SUBJECT, "Bob, a dashboard: the power state only"),
                "resources": {"thing:/features/power": {"grant": ["READ"], "revoke": []}}
            }
        }
    })
}

/// The demo thing.
fn demo_thing() -> Value {
    json!({
        "policyId": DEMO_THING,
        "attributes": {"model": "L-100", "location": "hall", "secret": "wifi-psk-4711"},
        "features": {
            "power": {"properties": {"on": false}},
            "temperature": {"properties": {"celsius": 21.5}}
        }
    })
}

/// Writes the demo policy and thing unless the data dir has them; `true` if it wrote them.
/// Runs before the server starts, straight on the store (the core reads both from it).
fn create_demo_thing(store: &dyn TwinStore) -> anyhow::Result<bool> {
    let thing_key = EntityKey::new(EntityKind::Thing, DEMO_THING);
    let policy_key = EntityKey::new(EntityKind::Policy, DEMO_THING);
    if store.get(&thing_key).is_some() {
        return Ok(false);
    }
    let limits = Limits::default();
    let demo = |e: WriteError<DittoError>| anyhow::anyhow!("cannot create the demo thing: {e}");
    if store.get(&policy_key).is_none() {
        let create = PolicyCommand {
            policy_id: PolicyId::parse(DEMO_THING)?,
            action: Action::Create,
            path: "/".to_owned(),
            value: Some(demo_policy()),
            headers: CommandHeaders::default(),
        };
        store
            .write(&policy_key, |current| {
                apply_policy_command(current, &create, now(), &limits).map(change_events)
            })
            .map_err(demo)?
            .durable
            .wait()?;
    }
    let create = ThingCommand {
        thing_id: ThingId::parse(DEMO_THING)?,
        action: Action::Create,
        path: ThingPath::root(),
        value: Some(demo_thing()),
        headers: CommandHeaders::default(),
    };
    store
        .write(&thing_key, |current| {
            apply_thing_command(current, &create, now(), &limits).map(change_events)
        })
        .map_err(demo)?
        .durable
        .wait()?;
    Ok(true)
}

fn change_events(applied: Applied) -> Vec<twin::Event> {
    match applied {
        Applied::Change(change) => vec![change.event],
        Applied::Retrieve(_) => Vec::new(),
    }
}

/// Creates (or refreshes) the demo solution and the dev issuer in `data`, the demo thing unless
/// it is there, and mints the four dev tokens.
pub(crate) fn prepare(dir: &DataDir, data: &Path, config: &mut Config) -> anyhow::Result<DevSetup> {
    let id = demo_solution_id()?;
    let secret = match dir.solutions.get(id.as_str()) {
        Some(_) => dir
            .solutions
            .add_secret(&*dir.store, &id, now())?
            .secret
            .expose()
            .to_owned(),
        None => dir
            .solutions
            .create(
                &*dir.store,
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
    dir.solutions.set_policy(&*dir.store, &id, policy, now())?;

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

    let signing_key = SigningKey::from_pkcs8_pem(&pem)?;
    let mint = |sub: &str| -> anyhow::Result<String> {
        let args = TokenArgs {
            key: key_file.clone(),
            iss: DEV_ISSUER.to_owned(),
            sub: sub.to_owned(),
            aud: vec!["thingsgate".to_owned()],
            claims: vec![format!("solution_id={id}")],
            ttl: "24h".to_owned(),
            kid: None,
        };
        let claims = token_cmd::token_claims(&args, SystemTime::now())?;
        Ok(signing_key.sign(&claims, None)?)
    };
    let demo_created = create_demo_thing(&*dir.store)?;
    Ok(DevSetup {
        token: mint(DEV_SUBJECT)?,
        device_token: mint(DEVICE_SUBJECT)?,
        alice_token: mint(ALICE_SUBJECT)?,
        bob_token: mint(BOB_SUBJECT)?,
        solution: id,
        secret,
        key_file,
        demo_created,
    })
}

/// Prints the client commands that work against this server: `mqtt` and `http` are the bound
/// addresses. Each command is one line; the `export` line comes first (the others use its
/// variables), comments start with `#`.
pub fn print_instructions(
    out: &mut impl Write,
    dev: &DevSetup,
    mqtt: SocketAddr,
    http: Option<SocketAddr>,
    amqp: Option<SocketAddr>,
) -> std::io::Result<()> {
    let host = mqtt.ip();
    let port = mqtt.port();
    let id = &dev.solution;
    let (namespace, name) = DEMO_THING
        .split_once(':')
        .unwrap_or((DEMO_NAMESPACE, "lamp"));
    let twin = format!("{namespace}/{name}/things/twin");
    let mqtt_as = |client: &str, user: &str, token: &str| {
        format!("-h {host} -p {port} -V mqttv5 -i {client} -u {user} -P \"${token}\"")
    };
    writeln!(
        out,
        "dev mode: solution `{id}` (namespace {DEMO_NAMESPACE}); dev issuer `{DEV_ISSUER}` (key {})",
        dev.key_file.display()
    )?;
    writeln!(
        out,
        "# demo thing {DEMO_THING}{}: the lamp (dev:{DEVICE_SUBJECT}) may change features/power \
         only; alice reads all but attributes/secret; bob reads features/power only",
        if dev.demo_created {
            ""
        } else {
            " (kept from this data dir)"
        }
    )?;
    writeln!(
        out,
        "# 1. paste first: tokens of the lamp, alice, bob and the developer (dev JWTs naming \
         their solution, 24 h)"
    )?;
    writeln!(
        out,
        "export LAMP_TOKEN='{}' ALICE_TOKEN='{}' BOB_TOKEN='{}' DEV_TOKEN='{}'",
        dev.device_token, dev.alice_token, dev.bob_token, dev.token
    )?;
    writeln!(
        out,
        "# 2. (another terminal, after the export) the lamp's events as alice may see them:"
    )?;
    writeln!(
        out,
        "mosquitto_sub {} -t '{twin}/events/#' -v",
        mqtt_as("alice-events", ALICE_SUBJECT, "ALICE_TOKEN")
    )?;
    writeln!(
        out,
        "# 3. the lamp switches its power on: allowed (PUBACK once the change is on disk)"
    )?;
    writeln!(
        out,
        "mosquitto_pub {} -d -q 1 -t {twin}/commands/modify/features/power/properties/on -m true",
        mqtt_as("lamp", DEVICE_SUBJECT, "LAMP_TOKEN")
    )?;
    writeln!(
        out,
        "# 4. the lamp moves itself to the garage: denied, PUBACK reason 135 (not authorized)"
    )?;
    writeln!(
        out,
        "mosquitto_pub {} -d -q 1 -t {twin}/commands/modify/attributes/location -m '\"garage\"'",
        mqtt_as("lamp", DEVICE_SUBJECT, "LAMP_TOKEN")
    )?;
    if let Some(http) = http {
        writeln!(
            out,
            "# 5. the same thing over HTTP: alice sees all but attributes/secret, bob only features/power"
        )?;
        for token in ["ALICE_TOKEN", "BOB_TOKEN"] {
            writeln!(
                out,
                "curl -s -H \"Authorization: Bearer ${token}\" http://{http}/api/2/things/{DEMO_THING}"
            )?;
        }
    }
    writeln!(
        out,
        "# 6. the developer lets bob read the model too: a live policy change (then read again as bob)"
    )?;
    writeln!(
        out,
        "mosquitto_pub {} -d -q 1 -t '{namespace}/{name}/policies/commands/modify/entries/dashboard/resources/thing:/attributes/model' -m '{{\"grant\":[\"READ\"],\"revoke\":[]}}'",
        mqtt_as("developer", DEV_SUBJECT, "DEV_TOKEN")
    )?;
    if let Some(amqp) = amqp {
        // Routing keys: MQTT levels joined with `.`, a `.` inside a level written `/`.
        let key = format!("{}.{name}.things.twin", namespace.replace('.', "/"));
        writeln!(
            out,
            "# 7. AMQP 0.9.1 (Debian's amqp-tools): alice's view of the events, and the lamp switching power off"
        )?;
        writeln!(
            out,
            "amqp-consume --url \"amqp://alice:$ALICE_TOKEN@{amqp}\" -e amq.topic -r '{key}.events.#' cat"
        )?;
        writeln!(
            out,
            "amqp-publish --url \"amqp://lamp:$LAMP_TOKEN@{amqp}\" -e amq.topic -r '{key}.commands.modify.features.power.properties.on' -p -b false"
        )?;
    }
    writeln!(
        out,
        "# plain topics: subscribe with the solution secret (basic auth: user name = solution ID)"
    )?;
    writeln!(
        out,
        "mosquitto_sub -h {host} -p {port} -V mqttv5 -i dev-sub -u {id} -P '{}' -t 'demo/#' -v",
        dev.secret
    )?;
    writeln!(
        out,
        "# publish with the developer's token (solution from its `solution_id` claim):"
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
