#![forbid(unsafe_code)]
use clap::{Parser, Subcommand};
use kube::CustomResourceExt;

#[derive(Parser)]
#[command(name = "rekey", version, about = "Rotates credentials end to end, with proof")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the SecretRotation CRD as YAML.
    Crd,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", serde_yaml::to_string(&rekey::crd::SecretRotation::crd())?);
        }
    }
    Ok(())
}
