use super::*;

const CONTRACT: &str = r#"
[store]
url = "sqlite://understudy.db"          # or postgres://user:pass@host/db

[providers.cloud]
type = "openai"                          # any OpenAI-compatible upstream
base_url = "http://127.0.0.1:9000/v1"
api_key_env = "OPENAI_API_KEY"

[providers.recorded]
type = "replay"
file = "calls.jsonl"                     # the import format below

[models.gpt-4o-mini]
provider = "cloud"
name = "gpt-4o-mini"
input_per_million = 0.15                 # money per 1M tokens
output_per_million = 0.60

[tasks.triage]
lead = "gpt-4o-mini"
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "understudy.toml", Path::new("/srv/app"))
}

#[test]
fn the_issue_contract_parses() {
    let config = parse(CONTRACT).expect("contract parses");
    assert_eq!(config.store.url, "sqlite:///srv/app/understudy.db");
    let ProviderConfig::OpenAi(cloud) = &config.providers["cloud"] else { panic!("cloud is openai") };
    assert_eq!(cloud.base_url, "http://127.0.0.1:9000/v1");
    assert_eq!(cloud.api_key_env.as_deref(), Some("OPENAI_API_KEY"));
    let ProviderConfig::Replay(recorded) = &config.providers["recorded"] else { panic!("replay") };
    assert_eq!(recorded.file, PathBuf::from("/srv/app/calls.jsonl"));
    assert_eq!(config.models["gpt-4o-mini"].price.output_per_million, 0.60);
    assert_eq!(config.tasks["triage"].policy, Policy::Lead);
    let resolved = config.resolve_model("task:triage").expect("task resolves");
    assert_eq!((resolved.task, resolved.model_name), (Some("triage"), "gpt-4o-mini"));
    assert!(config.resolve_model("task:nope").is_none());
    assert!(config.resolve_model("gpt-4o").is_none());
}

#[test]
fn the_init_template_parses() {
    let config = parse(TEMPLATE).expect("template parses");
    assert!(config.models.len() >= 5);
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
}

#[test]
fn an_unknown_key_names_the_key_and_line() {
    let text = CONTRACT.replace("lead = \"gpt-4o-mini\"", "lead = \"gpt-4o-mini\"\nleed = 1");
    let error = parse(&text).expect_err("unknown key").to_string();
    assert!(error.contains("leed"), "{error}");
    assert!(error.contains("line 22"), "{error}");
}

#[test]
fn a_dangling_model_reference_names_the_key_and_line() {
    let text = CONTRACT.replace("lead = \"gpt-4o-mini\"", "lead = \"gpt-5\"");
    let error = parse(&text).expect_err("dangling").to_string();
    assert_eq!(error, "understudy.toml:21: `tasks.triage.lead`: no model named `gpt-5` (known: gpt-4o-mini)");
}

#[test]
fn an_unknown_provider_type_is_an_error() {
    let text = CONTRACT.replace("type = \"replay\"", "type = \"carrier-pigeon\"");
    let error = parse(&text).expect_err("bad type").to_string();
    assert!(error.contains("carrier-pigeon"), "{error}");
}

#[test]
fn a_bad_base_url_names_its_line() {
    let text = CONTRACT.replace("http://127.0.0.1:9000/v1", "127.0.0.1:9000/v1");
    let error = parse(&text).expect_err("bad url").to_string();
    assert!(error.starts_with("understudy.toml:7: `providers.cloud.base_url`"), "{error}");
}

#[test]
fn a_bad_store_url_is_an_error() {
    let text = CONTRACT.replace("sqlite://understudy.db", "mysql://x");
    let error = parse(&text).expect_err("bad store").to_string();
    assert!(error.contains("store.url") && error.contains(":3:"), "{error}");
}

#[test]
fn datasets_dir_defaults_next_to_the_config_and_resolves_relative_paths() {
    let config = parse(CONTRACT).expect("contract parses");
    assert_eq!(config.store.datasets_dir, PathBuf::from("/srv/app/datasets"));
    let text = CONTRACT.replace("[store]\n", "[store]\ndatasets_dir = \"data/versions\"\n");
    let config = parse(&text).expect("datasets_dir parses");
    assert_eq!(config.store.datasets_dir, PathBuf::from("/srv/app/data/versions"));
}

#[test]
fn retention_is_in_whole_days_and_zero_names_the_line() {
    let config = parse(CONTRACT).expect("contract parses");
    assert_eq!((config.store.keep_bodies, config.store.keep_calls), (None, None));
    let text = CONTRACT.replace("[store]\n", "[store]\nkeep_bodies_days = 30\nkeep_calls_days = 365\n");
    let config = parse(&text).expect("retention parses");
    assert_eq!(config.store.keep_bodies, Some(std::time::Duration::from_secs(30 * 86_400)));
    assert_eq!(config.store.keep_calls, Some(std::time::Duration::from_secs(365 * 86_400)));
    let text = CONTRACT.replace("[store]\n", "[store]\nkeep_bodies_days = 0\n");
    let error = parse(&text).expect_err("zero days").to_string();
    assert!(error.contains(":3:") && error.contains("store.keep_bodies_days"), "{error}");
}

#[test]
fn a_task_kind_overrides_detection_and_a_bad_one_names_the_key_and_line() {
    let config = parse(CONTRACT).expect("contract parses");
    assert_eq!(config.tasks["triage"].kind, None);
    let text = CONTRACT.replace("lead = \"gpt-4o-mini\"", "lead = \"gpt-4o-mini\"\nkind = \"label\"");
    assert_eq!(parse(&text).expect("kind parses").tasks["triage"].kind, Some(TaskKind::Label));
    let text = CONTRACT.replace("lead = \"gpt-4o-mini\"", "lead = \"gpt-4o-mini\"\nkind = \"poetry\"");
    let error = parse(&text).expect_err("bad kind").to_string();
    assert_eq!(error, "understudy.toml:22: `tasks.triage.kind`: unknown kind `poetry` (known: label, generation)");
}

#[test]
fn labels_are_checked_and_name_the_key_and_line() {
    let with = |labels: &str| CONTRACT.replace("lead = \"gpt-4o-mini\"", &format!("lead = \"gpt-4o-mini\"\n{labels}"));
    let config = parse(&with("labels = [\"bug\", \"billing\"]")).expect("labels parse");
    assert_eq!(config.tasks["triage"].labels, Some(vec!["bug".to_string(), "billing".to_string()]));
    for (labels, needle) in [
        ("labels = []", "empty"),
        ("labels = [\"bug\", \" \"]", "blank"),
        ("labels = [\"bug\", \"Bug \"]", "`Bug ` appears twice"),
        ("kind = \"generation\"\nlabels = [\"bug\"]", "kind is generation"),
    ] {
        let error = parse(&with(labels)).expect_err(labels).to_string();
        assert!(error.starts_with("understudy.toml:2") && error.contains("`tasks.triage.labels`"), "{error}");
        assert!(error.contains(needle), "{error}");
    }
}

#[test]
fn a_local_models_weight_format_is_checked() {
    let local = "[providers.local]\ntype = \"local\"\n[models.small]\nprovider = \"local\"\npath = \"m.gguf\"\n";
    let config = parse(&format!("{CONTRACT}{local}weights = \"iq4_nl\"\n")).unwrap();
    assert_eq!(config.models["small"].weights.as_deref(), Some("iq4_nl"));
    assert_eq!(parse(&format!("{CONTRACT}{local}")).unwrap().models["small"].weights, None);
    let error = parse(&format!("{CONTRACT}{local}weights = \"q3\"\n")).unwrap_err().to_string();
    assert!(error.contains("models.small.weights") && error.contains("`q3`") && error.contains("iq4_nl"), "{error}");
    let cloud = CONTRACT.replace("output_per_million = 0.60", "output_per_million = 0.60\nweights = \"q8_0\"");
    let error = parse(&cloud).unwrap_err().to_string();
    assert!(error.contains("models.gpt-4o-mini.weights") && error.contains("local provider"), "{error}");
}

#[test]
fn auth_is_on_by_default_and_none_is_only_for_loopback() {
    assert_eq!(parse(CONTRACT).expect("contract parses").server.auth, Auth::Keys);
    let with_server = |server: &str| format!("[server]\n{server}\n{CONTRACT}");
    let config = parse(&with_server("auth = \"none\"")).expect("none on the default loopback listen");
    assert_eq!(config.server.auth, Auth::None);
    let config = parse(&with_server("listen = \"[::1]:9000\"\nauth = \"none\"")).expect("none on ::1");
    assert_eq!(config.server.auth, Auth::None);
    // Keys make any address fine.
    let config = parse(&with_server("listen = \"0.0.0.0:8080\"")).expect("keys on any address");
    assert_eq!((config.server.auth, config.server.listen.to_string().as_str()), (Auth::Keys, "0.0.0.0:8080"));

    let error = parse(&with_server("listen = \"0.0.0.0:8080\"\nauth = \"none\"")).expect_err("exposed").to_string();
    assert!(error.starts_with("understudy.toml:3: `server.auth`"), "{error}");
    assert!(error.contains("0.0.0.0:8080") && error.contains("loopback") && error.contains("keys create"), "{error}");
    let error = parse(&with_server("auth = \"maybe\"")).expect_err("unknown").to_string();
    assert_eq!(error, "understudy.toml:2: `server.auth`: unknown auth `maybe` (known: keys, none)");

    // `serve --listen` overrides the file's address, and is checked the same way.
    let config = parse(&with_server("auth = \"none\"")).expect("loopback");
    assert!(config.server.check_exposure("127.0.0.1:1".parse().expect("addr")).is_ok());
    assert!(config.server.check_exposure("10.1.2.3:8080".parse().expect("addr")).is_err());
}

#[test]
fn shared_limits_take_a_redis_url() {
    let with_server = |server: &str| format!("[server]\n{server}\n{CONTRACT}");
    assert_eq!(parse(CONTRACT).expect("parses").server.limits_redis_url, None);
    let config = parse(&with_server("limits_redis_url = \"redis://127.0.0.1:6379\"")).expect("redis");
    assert_eq!(config.server.limits_redis_url.as_deref(), Some("redis://127.0.0.1:6379"));
    let error = parse(&with_server("limits_redis_url = \"http://127.0.0.1:6379\"")).expect_err("bad").to_string();
    assert_eq!(error, "understudy.toml:2: `server.limits_redis_url`: `http://127.0.0.1:6379` is not a redis:// URL");
}

#[test]
fn traces_go_to_an_otlp_http_endpoint() {
    let off = parse(CONTRACT).expect("parses").telemetry;
    assert_eq!((off.otlp_endpoint, off.service_name.as_str()), (None, "understudy"));
    let with = |telemetry: &str| format!("{CONTRACT}\n[telemetry]\n{telemetry}\n");
    let on = parse(&with("otlp_endpoint = \"http://127.0.0.1:4318/\"\nservice_name = \"gw-a\"")).expect("otlp");
    assert_eq!(on.telemetry.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4318"));
    assert_eq!(on.telemetry.service_name, "gw-a");
    let error = parse(&with("otlp_endpoint = \"127.0.0.1:4317\"")).expect_err("bad").to_string();
    assert!(error.contains("`telemetry.otlp_endpoint`: `127.0.0.1:4317` is not an http:// or https:// URL"), "{error}");
}

const ANTHROPIC: &str = r#"
[providers.claude]
type = "anthropic"

[providers.claude-proxy]
type = "anthropic"
base_url = "http://127.0.0.1:9100/"
api_key_env = "PROXY_KEY"
anthropic_version = "2024-01-01"
timeout_secs = 5
max_retries = 0
retry_backoff_ms = 50

[models.claude-sonnet-4]
provider = "claude"
name = "claude-sonnet-4-0"
input_per_million = 3.0
output_per_million = 15.0
"#;

#[test]
fn an_anthropic_provider_has_defaults_and_takes_its_keys() {
    let config = parse(ANTHROPIC).expect("anthropic config parses");
    let ProviderConfig::Anthropic(claude) = &config.providers["claude"] else { panic!("claude is anthropic") };
    assert_eq!(claude.base_url, "https://api.anthropic.com");
    assert_eq!(claude.api_key_env, "ANTHROPIC_API_KEY");
    assert_eq!(claude.anthropic_version, "2023-06-01");
    assert_eq!((claude.timeout, claude.max_retries), (Duration::from_secs(60), 2));
    assert_eq!(config.providers["claude"].provider_type(), "anthropic");
    let ProviderConfig::Anthropic(proxy) = &config.providers["claude-proxy"] else { panic!("proxy is anthropic") };
    assert_eq!(proxy.base_url, "http://127.0.0.1:9100");
    assert_eq!(proxy.api_key_env, "PROXY_KEY");
    assert_eq!(proxy.anthropic_version, "2024-01-01");
    assert_eq!((proxy.timeout, proxy.max_retries), (Duration::from_secs(5), 0));
    assert_eq!(proxy.retry_backoff, Duration::from_millis(50));
    assert_eq!(config.models["claude-sonnet-4"].price.output_per_million, 15.0);
}

#[test]
fn a_bad_anthropic_value_names_the_key_and_line() {
    let text = ANTHROPIC.replace("base_url = \"http://127.0.0.1:9100/\"", "base_url = \"api.anthropic.com\"");
    let error = parse(&text).expect_err("a base_url without a scheme").to_string();
    assert!(error.contains("providers.claude-proxy.base_url"), "{error}");
    assert!(error.contains("understudy.toml:7"), "{error}");

    let text = ANTHROPIC.replace("anthropic_version = \"2024-01-01\"", "anthropic_version = \" \"");
    let error = parse(&text).expect_err("a blank version").to_string();
    assert!(error.contains("providers.claude-proxy.anthropic_version") && error.contains(":9"), "{error}");

    let text = ANTHROPIC.replace("max_retries = 0", "max_retries = 0\nmax_token = 5");
    let error = parse(&text).expect_err("an unknown key").to_string();
    assert!(error.contains("max_token"), "{error}");
}

#[test]
fn the_init_template_prices_claude_models() {
    let config = parse(TEMPLATE).expect("template parses");
    assert!(matches!(config.providers["anthropic"], ProviderConfig::Anthropic(_)));
    let sonnet = &config.models["claude-sonnet-4"];
    assert_eq!(
        (sonnet.provider.as_str(), sonnet.price.input_per_million, sonnet.price.output_per_million),
        ("anthropic", 3.0, 15.0)
    );
    let haiku = &config.models["claude-haiku-3_5"];
    assert_eq!((haiku.price.input_per_million, haiku.price.output_per_million), (0.80, 4.0));
}

#[test]
fn autopilot_settings_have_defaults_and_a_bad_one_names_the_key_and_line() {
    let config = parse(&format!("{CONTRACT}\n[tasks.triage.autopilot]\nmin_calls = 300\n")).expect("defaults");
    let settings = config.tasks["triage"].autopilot.as_ref().expect("autopilot on");
    assert_eq!((settings.min_calls, settings.shadow_calls, settings.drift_window), (300, 100, 200));
    assert_eq!(settings.recertify_calls, 100, "a serving cascade is certified again on live calls");
    assert_eq!(settings.train_window, None, "trains on every call unless told");

    let text = format!("{CONTRACT}\n[tasks.triage.autopilot]\nmin_calls = 300\ntrain_window = 1200\n");
    let settings = parse(&text).expect("a window").tasks["triage"].autopilot.clone().expect("on");
    assert_eq!(settings.train_window, Some(1200));

    let text = format!("{CONTRACT}\n[tasks.triage.autopilot]\nmin_calls = 300\ntrain_window = 100\n");
    let error = parse(&text).expect_err("a window below min_calls").to_string();
    assert!(
        error.contains("tasks.triage.autopilot.train_window") && error.contains("at least min_calls (300)"),
        "{error}"
    );
    assert!(error.contains("understudy.toml:23"), "{error}");

    let off = parse(&format!("{CONTRACT}\n[tasks.triage.autopilot]\nenabled = false\n")).expect("off");
    assert!(off.tasks["triage"].autopilot.is_none());
}

#[test]
fn a_local_providers_max_batch_is_checked_and_named_by_its_line() {
    let local = |extra: &str| format!("{CONTRACT}\n[providers.local]\ntype = \"local\"\n{extra}\n");
    assert_eq!(parse(CONTRACT).unwrap().local_max_batch(), DEFAULT_LOCAL_MAX_BATCH);
    assert_eq!(parse(&local("")).unwrap().local_max_batch(), DEFAULT_LOCAL_MAX_BATCH);
    let config = parse(&local("max_batch = 1")).unwrap();
    assert_eq!(config.local_max_batch(), 1);
    let ProviderConfig::Local(provider) = &config.providers["local"] else { panic!("local") };
    assert_eq!(provider.max_batch, 1);
    for bad in ["max_batch = 0", "max_batch = -3", "max_batch = 5000"] {
        let text = local(bad);
        let line = text.lines().position(|line| line == bad).unwrap() + 1;
        let error = parse(&text).expect_err(bad).to_string();
        assert!(error.contains("providers.local.max_batch"), "{error}");
        assert!(error.contains(&format!("understudy.toml:{line}")), "{error}");
    }
}

#[test]
fn a_local_providers_speculative_draft_is_checked_and_named_by_its_line() {
    let local = |extra: &str| format!("{CONTRACT}\n[providers.local]\ntype = \"local\"\n{extra}\n");
    assert_eq!(parse(CONTRACT).unwrap().local_speculative_draft(), DEFAULT_SPECULATIVE_DRAFT);
    assert_eq!(parse(&local("")).unwrap().local_speculative_draft(), DEFAULT_SPECULATIVE_DRAFT);
    assert_eq!(parse(&local("speculative_draft = 0")).unwrap().local_speculative_draft(), 0);
    let config = parse(&local("speculative_draft = 4")).unwrap();
    assert_eq!(config.local_speculative_draft(), 4);
    for bad in ["speculative_draft = -1", "speculative_draft = 65", "speculative_draft = 100000"] {
        let text = local(bad);
        let line = text.lines().position(|line| line == bad).unwrap() + 1;
        let error = parse(&text).expect_err(bad).to_string();
        assert!(error.contains("providers.local.speculative_draft"), "{error}");
        assert!(error.contains(&format!("understudy.toml:{line}")), "{error}");
    }
}
