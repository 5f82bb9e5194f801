//! The one-shot commands: each turns its arguments into one API call and prints the answer.

use crate::args::{BucketCommand, Cli, Command, WriteOpts};
use crate::client::{ApiClient, ApiResponse, Call};
use crate::error::CliError;
use crate::status::render_status;
use reqwest::Method;
use serde_json::{json, Value};
use std::io::Write;

/// Runs every subcommand except `bench`.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let client = ApiClient::new(cli.url, cli.token, cli.session, cli.timeout, cli.verbose)?;
    match cli.command {
        Command::Put {
            bucket,
            key,
            json_value,
            context,
            write,
        } => {
            let json_value = if json_value == "-" {
                // Values too large for a command line come this way.
                std::io::read_to_string(std::io::stdin()).map_err(|e| {
                    CliError::Usage(format!("cannot read the value from stdin: {e}"))
                })?
            } else {
                json_value
            };
            let value: Value = serde_json::from_str(&json_value).map_err(|e| {
                CliError::Usage(format!(
                    "JSON_VALUE is not valid JSON ({e}); quote strings, e.g. '\"hello\"'"
                ))
            })?;
            let call = write_options(Call::new(Method::PUT, &["v1", "kv", &bucket, &key]), &write)
                .header("x-meridian-context", context)
                .json(to_body(&value)?);
            print_body(&client.send(call).await?)
        }
        Command::Get {
            bucket,
            key,
            consistency,
        } => {
            let call = Call::new(Method::GET, &["v1", "kv", &bucket, &key])
                .query("consistency", consistency.map(|c| c.as_str()));
            print_body(&client.send(call).await?)
        }
        Command::Delete {
            bucket,
            key,
            context,
            write,
        } => {
            let call = write_options(
                Call::new(Method::DELETE, &["v1", "kv", &bucket, &key]),
                &write,
            )
            .header("x-meridian-context", context);
            print_body(&client.send(call).await?)
        }
        Command::Incr {
            bucket,
            key,
            by,
            write,
        } => {
            let call = Call::new(Method::POST, &["v1", "kv", &bucket, &key, "increment"])
                .json(to_body(&json!({ "by": by }))?);
            print_body(&client.send(write_options(call, &write)).await?)
        }
        Command::Add {
            bucket,
            key,
            members,
            write,
        } => {
            let call = Call::new(Method::POST, &["v1", "kv", &bucket, &key, "add"])
                .json(to_body(&json!({ "members": members }))?);
            print_body(&client.send(write_options(call, &write)).await?)
        }
        Command::Remove {
            bucket,
            key,
            members,
            write,
        } => {
            let call = Call::new(Method::POST, &["v1", "kv", &bucket, &key, "remove"])
                .json(to_body(&json!({ "members": members }))?);
            print_body(&client.send(write_options(call, &write)).await?)
        }
        Command::Buckets => print_body(
            &client
                .send(Call::new(Method::GET, &["v1", "buckets"]))
                .await?,
        ),
        Command::Bucket {
            action:
                BucketCommand::Create {
                    name,
                    kind,
                    home_region,
                },
        } => {
            let mut definition = json!({ "type": kind.as_str() });
            if let Some(home) = home_region {
                definition["home_region"] = Value::String(home.to_string());
            }
            let call =
                Call::new(Method::PUT, &["v1", "buckets", &name]).json(to_body(&definition)?);
            print_body(&client.send(call).await?)
        }
        Command::Bucket {
            action: BucketCommand::Get { name },
        } => print_body(
            &client
                .send(Call::new(Method::GET, &["v1", "buckets", &name]))
                .await?,
        ),
        Command::List {
            bucket,
            prefix,
            limit,
            after,
            consistency,
        } => {
            let call = Call::new(Method::GET, &["v1", "kv", &bucket])
                .query("prefix", prefix)
                .query("limit", limit)
                .query("after", after)
                .query("consistency", consistency.map(|c| c.as_str()));
            print_body(&client.send(call).await?)
        }
        Command::Status { json } => {
            let response = client
                .send(Call::new(Method::GET, &["v1", "cluster"]))
                .await?;
            if json {
                print_body(&response)
            } else {
                let cluster = parse_json(&response)?;
                let table = render_status(&cluster).map_err(CliError::Failed)?;
                write_stdout(&table)
            }
        }
        Command::Bench(_) => Err(CliError::Failed(
            "bench is not a one-shot command".to_owned(),
        )),
    }
}

/// Adds `ack=` and `Idempotency-Key` when given.
fn write_options(call: Call, write: &WriteOpts) -> Call {
    call.query("ack", write.ack.map(|a| a.as_str()))
        .header("idempotency-key", write.idempotency_key)
}

fn to_body(value: &Value) -> Result<Vec<u8>, CliError> {
    serde_json::to_vec(value).map_err(|e| CliError::Failed(format!("cannot encode the body: {e}")))
}

fn parse_json(response: &ApiResponse) -> Result<Value, CliError> {
    serde_json::from_slice(&response.body).map_err(|e| {
        CliError::Failed(format!(
            "the server answered HTTP {} with a body that is not JSON: {e}",
            response.status
        ))
    })
}

/// Prints the JSON body pretty, nothing when empty; any other body is a failure (the URL is
/// not a Meridian region, or something between answered instead).
fn print_body(response: &ApiResponse) -> Result<(), CliError> {
    if response.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let text = serde_json::to_string_pretty(&parse_json(response)?)
        .map_err(|e| CliError::Failed(format!("cannot format the answer: {e}")))?;
    write_stdout(&format!("{text}\n"))
}

/// Writes to stdout, treating a closed pipe (e.g. `| head`) as success rather than a panic.
pub fn write_stdout(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Failed(format!("cannot write to stdout: {e}"))),
    }
}
