//! `understudy init`: writes the commented config template.

use std::path::Path;

use crate::cli::InitCommand;

pub fn run(config_path: &Path, command: InitCommand) -> anyhow::Result<()> {
    if config_path.exists() && !command.force {
        anyhow::bail!("{} exists already (pass --force to overwrite it)", config_path.display());
    }
    std::fs::write(config_path, understudy_config::TEMPLATE)
        .map_err(|error| anyhow::anyhow!("cannot write {}: {error}", config_path.display()))?;
    println!("wrote {}", config_path.display());
    println!("next: set the API key variable it names, then run `understudy serve`");
    Ok(())
}
