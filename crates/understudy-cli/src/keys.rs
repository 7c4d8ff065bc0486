//! `understudy keys`: the gateway keys clients authenticate with.
//!
//! A key's secret is printed once, by `create`; the store keeps its hash
//! (`understudy_gateway::auth`). Running gateways reload keys every second,
//! so a revocation reaches them without a restart.

use std::path::Path;

use serde_json::{json, Value};
use understudy_config::Config;
use understudy_gateway::auth::{create_key, NewKey};
use understudy_store::Store;
use understudy_types::{Budget, BudgetPeriod, GatewayKey, OffsetDateTime};

use crate::cli::{KeysCommand, KeysCreateArgs};
use crate::output::{format_time, load_config, open_store, parse_time, table};

pub async fn run(config_path: &Path, command: KeysCommand) -> anyhow::Result<()> {
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let result = match command {
        KeysCommand::Create(args) => create(&config, &store, args).await,
        KeysCommand::List { json } => list(&store, json).await,
        KeysCommand::Show { key, json } => show(&store, &key, json).await,
        KeysCommand::Revoke { key } => revoke(&store, &key).await,
    };
    store.close().await;
    result
}

/// A scope naming a task or model the config does not have is a typo.
fn check_scope(config: &Config, args: &KeysCreateArgs) -> anyhow::Result<()> {
    let known = |names: Vec<&String>| names.iter().map(|name| name.as_str()).collect::<Vec<_>>().join(", ");
    for task in args.tasks.iter().flatten() {
        anyhow::ensure!(
            config.tasks.contains_key(task.trim()),
            "--tasks: no task `{task}` in the config (known: {})",
            known(config.tasks.keys().collect())
        );
    }
    for model in args.models.iter().flatten() {
        anyhow::ensure!(
            config.models.contains_key(model.trim()),
            "--models: no model `{model}` in the config (known: {})",
            known(config.models.keys().collect())
        );
    }
    Ok(())
}

async fn create(config: &Config, store: &Store, args: KeysCreateArgs) -> anyhow::Result<()> {
    check_scope(config, &args)?;
    let period = match args.period.as_deref() {
        None => BudgetPeriod::Month,
        Some(text) => BudgetPeriod::parse(text).ok_or_else(|| anyhow::anyhow!("--period `{text}`: day or month"))?,
    };
    let expires_at = args.expires.as_deref().map(|text| parse_time(text, "expires")).transpose()?;
    if let Some(at) = expires_at {
        anyhow::ensure!(at > OffsetDateTime::now_utc(), "--expires {} is in the past", format_time(at));
    }
    let new = NewKey {
        name: args.name,
        tasks: args.tasks,
        models: args.models,
        budget: args.budget_usd.map(|usd| Budget { usd, period }),
        rpm: args.rpm,
        tpm: args.tpm,
        expires_at,
        admin: args.admin,
    };
    let (secret, key) = create_key(store, new).await?;
    if args.json {
        let mut value = key_json(&key);
        value["key"] = Value::String(secret);
        println!("{value}");
        return Ok(());
    }
    println!("{secret}");
    eprintln!(
        "key `{}` ({}) created. Copy it now: it is shown this once, and the store keeps only its hash.\n\
         Clients send it as `Authorization: Bearer <key>` (the api_key of OpenAI's SDKs).",
        key.name, key.id
    );
    Ok(())
}

/// One key, or an error naming what matched.
async fn find_one(store: &Store, text: &str) -> anyhow::Result<GatewayKey> {
    let mut found = store.find_keys(text).await?;
    // A name may belong to revoked keys and their live replacement.
    if found.len() > 1 {
        let live: Vec<GatewayKey> = found.iter().filter(|key| key.revoked_at.is_none()).cloned().collect();
        if live.len() == 1 {
            found = live;
        }
    }
    match found.len() {
        0 => anyhow::bail!("no key with id or name `{text}` (see `understudy keys list`)"),
        1 => Ok(found.remove(0)),
        n => anyhow::bail!("`{text}` matches {n} keys; give more of the id"),
    }
}

fn status(key: &GatewayKey) -> String {
    match key.unusable_at(OffsetDateTime::now_utc()) {
        None => "active".to_string(),
        Some(understudy_types::KeyUnusable::Revoked) => "revoked".to_string(),
        Some(understudy_types::KeyUnusable::Expired(_)) => "expired".to_string(),
    }
}

fn key_json(key: &GatewayKey) -> Value {
    json!({
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "status": status(key),
        "tasks": key.tasks,
        "models": key.models,
        "budget_usd": key.budget.map(|budget| budget.usd),
        "period": key.budget.map(|budget| budget.period.as_str()),
        "rpm": key.rpm,
        "tpm": key.tpm,
        "expires_at": key.expires_at.map(format_time),
        "admin": key.admin,
        "created_at": format_time(key.created_at),
        "revoked_at": key.revoked_at.map(format_time),
    })
}

fn scope(key: &GatewayKey) -> String {
    let mut parts = Vec::new();
    if let Some(tasks) = &key.tasks {
        parts.push(format!("tasks {}", tasks.join(",")));
    }
    if let Some(models) = &key.models {
        parts.push(format!("models {}", models.join(",")));
    }
    if parts.is_empty() {
        "all".to_string()
    } else {
        parts.join("; ")
    }
}

fn optional<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |value| value.to_string())
}

async fn list(store: &Store, json: bool) -> anyhow::Result<()> {
    let keys = store.list_keys().await?;
    if json {
        for key in &keys {
            println!("{}", key_json(key));
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|key| {
            vec![
                key.name.clone(),
                format!("{}…", key.prefix),
                status(key),
                scope(key),
                key.budget
                    .map_or_else(|| "-".to_string(), |budget| format!("${}/{}", budget.usd, budget.period.as_str())),
                optional(key.rpm),
                optional(key.tpm),
                optional(key.expires_at.map(format_time)),
                if key.admin { "yes".into() } else { "no".into() },
                key.id.clone(),
            ]
        })
        .collect();
    let header = ["name", "key", "status", "scope", "budget", "rpm", "tpm", "expires (UTC)", "admin", "id"];
    print!("{}", table(&header, &rows));
    Ok(())
}

async fn show(store: &Store, text: &str, json: bool) -> anyhow::Result<()> {
    let key = find_one(store, text).await?;
    let now = OffsetDateTime::now_utc();
    let spent = match key.budget {
        Some(budget) => Some(store.key_spend_since(&key.id, budget.period.start_of(now)).await?),
        None => None,
    };
    if json {
        let mut value = key_json(&key);
        value["spent_this_period_usd"] = json!(spent.map(|spent| spent.dollars()));
        println!("{value}");
        return Ok(());
    }
    println!("key {} ({}…), {}", key.name, key.prefix, status(&key));
    println!("  id        {}", key.id);
    println!("  scope     {}", scope(&key));
    if let (Some(budget), Some(spent)) = (key.budget, spent) {
        println!(
            "  budget    ${} a {}; ${:.6} spent this {}",
            budget.usd,
            budget.period.as_str(),
            spent.dollars(),
            budget.period.as_str()
        );
    }
    println!("  limits    rpm {}, tpm {}", optional(key.rpm), optional(key.tpm));
    println!("  admin     {}", if key.admin { "yes" } else { "no" });
    println!("  created   {}", format_time(key.created_at));
    if let Some(at) = key.expires_at {
        println!("  expires   {}", format_time(at));
    }
    if let Some(at) = key.revoked_at {
        println!("  revoked   {}", format_time(at));
    }
    Ok(())
}

async fn revoke(store: &Store, text: &str) -> anyhow::Result<()> {
    let key = find_one(store, text).await?;
    if key.revoked_at.is_some() {
        println!("key {} ({}) was revoked already", key.name, key.id);
        return Ok(());
    }
    store.revoke_key(&key.id, OffsetDateTime::now_utc()).await?;
    println!("key {} ({}) revoked; running gateways refuse it within a second", key.name, key.id);
    Ok(())
}
