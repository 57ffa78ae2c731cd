//! `blockctl credentials`: object-store locations for cloud backups.
//!
//! Named after `pxctl credentials`; the API calls them locations
//! (`/v1/locations`). Secrets go to the daemon once, at create, and are
//! never shown again: the daemon lists only non-secret fields, and this
//! module never prints what it sends.

use crate::failure::Failure;
use std::path::{Path, PathBuf};

use blockd_api::{CreateLocation, Location, Provider, Secret};
use clap::{Args, Subcommand};

use crate::client::Client;
use crate::encode;
use crate::output::{self, line, Output};

/// Parses `--provider`.
fn provider_arg(s: &str) -> Result<Provider, String> {
    s.parse()
}

/// `pxctl credentials` verbs.
#[derive(Debug, Subcommand)]
pub enum CredentialsCmd {
    /// Create credentials for an object store (NAME is the --cred-id of cloudsnap commands)
    #[command(alias = "c")]
    #[command(
        after_help = "Examples:\n  read -rs KEY && read -rs PASS && BLOCKD_S3_SECRET_KEY=$KEY BLOCKD_ENCRYPTION_PASSPHRASE=$PASS blockctl credentials create s3 --provider s3 --s3-endpoint s3.example.com --s3-region eu-west-1 --s3-access-key AKIA... --bucket backups\n  blockctl credentials create nas --provider local --path /srv/backups\n  BLOCKD_S3_SECRET_KEY=... blockctl credentials create dr --provider s3 --s3-endpoint s3.example.com --s3-access-key AKIA-READER --bucket backups --read-only\n\nSecrets are best given in the environment, as above: as flags, every user of the host sees them in `ps` while the command runs."
    )]
    Create(Box<CreateArgs>),
    /// List credentials (secrets are never shown)
    #[command(aliases = ["ls", "l"])]
    #[command(after_help = "Example:\n  blockctl credentials list")]
    List,
    /// Delete credentials (cloud snapshots stored with them stay in the object store)
    #[command(alias = "rm")]
    #[command(after_help = "Example:\n  blockctl credentials delete s3")]
    Delete {
        /// Credentials name
        name: String,
    },
    /// Check that the object store is reachable and usable with these credentials
    #[command(after_help = "Example:\n  blockctl credentials validate s3")]
    Validate {
        /// Credentials name
        name: String,
    },
}

/// Flags of `credentials create`, named as in `pxctl credentials create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Credentials name
    #[arg(value_parser = crate::name_arg("credentials name"))]
    name: String,
    /// Object-store provider: local, s3, azure or google
    #[arg(long, value_parser = provider_arg)]
    provider: Provider,
    /// Bucket (s3, google) or container (azure)
    #[arg(long)]
    bucket: Option<String>,
    /// Directory holding the objects (local provider)
    #[arg(long)]
    path: Option<PathBuf>,
    /// Key prefix inside the bucket
    #[arg(long)]
    prefix: Option<String>,
    /// S3 endpoint, host:port or a URL, e.g. s3.amazonaws.com
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// S3 region, e.g. us-east-1
    #[arg(long)]
    s3_region: Option<String>,
    /// S3 access key id
    #[arg(long)]
    s3_access_key: Option<String>,
    /// S3 secret key (better in the environment: flags show in `ps`)
    #[arg(long, env = "BLOCKD_S3_SECRET_KEY", hide_env_values = true)]
    s3_secret_key: Option<String>,
    /// Plain HTTP to the S3 endpoint
    #[arg(long)]
    s3_disable_ssl: bool,
    /// Virtual-hosted-style S3 requests instead of path style
    #[arg(long)]
    disable_path_style: bool,
    /// S3 storage class for new objects, e.g. STANDARD or STANDARD_IA
    #[arg(long)]
    s3_storage_class: Option<String>,
    /// Azure storage account name
    #[arg(long)]
    azure_account_name: Option<String>,
    /// Azure storage account key (better in the environment: flags show in `ps`)
    #[arg(long, env = "BLOCKD_AZURE_ACCOUNT_KEY", hide_env_values = true)]
    azure_account_key: Option<String>,
    /// Azure Blob endpoint URL (emulators, sovereign clouds)
    #[arg(long)]
    azure_endpoint: Option<String>,
    /// Google Cloud project id
    #[arg(long)]
    google_project_id: Option<String>,
    /// Google service-account JSON key file (blockd reads it at create)
    #[arg(long)]
    google_json_key_file: Option<PathBuf>,
    /// Passphrase encrypting everything stored; needed again to restore
    /// elsewhere (better in the environment: flags show in `ps`)
    #[arg(long, env = "BLOCKD_ENCRYPTION_PASSPHRASE", hide_env_values = true)]
    encryption_passphrase: Option<String>,
    /// Keys that may only read (a host that restores and browses): nothing
    /// is written with them; backups, deletes and gc through them are refused
    #[arg(long)]
    read_only: bool,
}

/// An absolute path as text: the daemon resolves paths against its own
/// working directory, not ours.
fn absolute(p: &Path) -> Result<String, String> {
    let abs = std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))?;
    abs.into_os_string()
        .into_string()
        .map_err(|p| format!("{}: not valid UTF-8", PathBuf::from(p).display()))
}

impl CreateArgs {
    /// The API request.
    fn request(&self) -> Result<CreateLocation, String> {
        Ok(CreateLocation {
            name: self.name.clone(),
            provider: Some(self.provider),
            bucket: self.bucket.clone(),
            path: self.path.as_deref().map(absolute).transpose()?,
            prefix: self.prefix.clone(),
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
            s3_access_key: self.s3_access_key.clone(),
            // Secret keys may come from the environment, set for another
            // provider: only the chosen provider's is sent.
            s3_secret_key: self
                .s3_secret_key
                .clone()
                .filter(|_| self.provider == Provider::S3)
                .map(Secret::from),
            s3_disable_ssl: self.s3_disable_ssl,
            disable_path_style: self.disable_path_style,
            s3_storage_class: self.s3_storage_class.clone(),
            azure_account_name: self.azure_account_name.clone(),
            azure_account_key: self
                .azure_account_key
                .clone()
                .filter(|_| self.provider == Provider::Azure)
                .map(Secret::from),
            azure_endpoint: self.azure_endpoint.clone(),
            google_project_id: self.google_project_id.clone(),
            google_json_key_file: self
                .google_json_key_file
                .as_deref()
                .map(absolute)
                .transpose()?,
            encryption_passphrase: self.encryption_passphrase.clone().map(Secret::from),
            read_only: self.read_only,
        })
    }
}

/// Runs a `credentials` verb.
pub async fn run(out: Output, client: &Client, cmd: &CredentialsCmd) -> Result<(), Failure> {
    match cmd {
        CredentialsCmd::Create(args) => {
            let req = args.request()?;
            let loc: Location = client.call("POST", "/v1/locations", Some(&req)).await?;
            out.answer(&loc, |loc| {
                line(format_args!(
                    "Credentials created successfully, name: {}",
                    loc.name
                ));
            });
        }
        CredentialsCmd::List => {
            let locs: Vec<Location> = client.call::<(), _>("GET", "/v1/locations", None).await?;
            out.answer(locs.as_slice(), print_locations);
        }
        CredentialsCmd::Delete { name } => {
            let path = format!("/v1/locations/{}", encode(name));
            client.call_empty("DELETE", &path).await?;
            out.answer(&serde_json::json!({ "deleted": name }), |_| {
                line(format_args!("Credentials {name} deleted."));
            });
        }
        CredentialsCmd::Validate { name } => {
            let path = format!("/v1/locations/{}/validate", encode(name));
            let loc: Location = client.call::<(), _>("POST", &path, None).await?;
            out.answer(&loc, |loc| {
                line(format_args!("Credentials {} validated", loc.name));
            });
        }
    }
    Ok(())
}

/// `-` for an absent value.
fn or_dash(s: Option<&str>) -> String {
    s.unwrap_or("-").to_string()
}

/// The BUCKET/PATH column: bucket (with its key prefix) or directory.
fn place(l: &Location) -> String {
    let base = l.bucket.as_deref().or(l.path.as_deref()).unwrap_or("-");
    match l.prefix.as_deref().filter(|p| !p.is_empty()) {
        Some(p) => format!(
            "{}/{}",
            base.trim_end_matches('/'),
            p.trim_start_matches('/')
        ),
        None => base.to_string(),
    }
}

/// Prints the credentials table.
fn print_locations(locs: &[Location]) {
    let header = [
        "NAME",
        "PROVIDER",
        "BUCKET/PATH",
        "ENDPOINT",
        "REGION",
        "ACCOUNT",
        "SSL",
        "ENCRYPTION",
        "ACCESS",
    ];
    let rows: Vec<[String; 9]> = locs
        .iter()
        .map(|l| {
            [
                l.name.clone(),
                l.provider.to_string(),
                place(l),
                or_dash(l.endpoint.as_deref()),
                or_dash(l.region.as_deref()),
                or_dash(l.account.as_deref()),
                if l.provider == Provider::Local {
                    "-".into()
                } else {
                    l.ssl.to_string()
                },
                l.encryption.to_string(),
                if l.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
                .into(),
            ]
        })
        .collect();
    output::table(&header, &rows);
}
