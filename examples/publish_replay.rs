//! Connects to a running ensync-server, publishes a batch of events and
//! replays them, printing what comes back.
//!
//! ```text
//! cargo run --release --bin ensync-server            # in one terminal
//! cargo run --example publish_replay [ADDR] [COUNT]  # in another
//! ```

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

const EVENT_NAME: &str = "demo/order/created";

async fn next_line(lines: &mut Lines<BufReader<OwnedReadHalf>>) -> Result<String> {
    lines
        .next_line()
        .await?
        .context("the server closed the connection")
}

/// Reads lines until one that is not a live `+RECORD:` delivery.
async fn reply(lines: &mut Lines<BufReader<OwnedReadHalf>>) -> Result<String> {
    loop {
        let line = next_line(lines).await?;
        if !line.starts_with("+RECORD:") {
            return Ok(line);
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7070".to_owned());
    let count: usize = args
        .next()
        .map_or(Ok(5), |n| n.parse())
        .context("COUNT must be a number")?;
    let client = format!("example-{}", std::process::id());

    let stream = TcpStream::connect(&addr)
        .await
        .with_context(|| format!("cannot connect to {addr}; is ensync-server running?"))?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();

    // CONN and SUB first: REPLAY needs a subscription covering the name.
    write
        .write_all(
            format!("CONN;CLIENT_ID={client}\nSUB;CLIENT_ID={client};EVENT_NAME=demo/*\n")
                .as_bytes(),
        )
        .await?;
    println!("{}", reply(&mut lines).await?);
    println!("{}", reply(&mut lines).await?);

    // Publish the batch in one write: the server answers in order, and
    // one disk flush covers many of them.
    let mut batch = String::new();
    for i in 0..count {
        batch.push_str(&format!(
            "PUB;CLIENT_ID={client};EVENT_NAME={EVENT_NAME};PAYLOAD={{\"order\":{i},\"note\":\"a;b\"}};DELIVERY_TO={client}\n"
        ));
    }
    write.write_all(batch.as_bytes()).await?;
    let mut first_idem = None;
    for _ in 0..count {
        let line = reply(&mut lines).await?;
        let Some(rest) = line.strip_prefix("+PASS:PUBLISHED;IDEM=") else {
            bail!("publish failed: {line}");
        };
        first_idem.get_or_insert_with(|| rest.split(';').next().unwrap_or_default().to_owned());
    }
    let first_idem = first_idem.context("COUNT must be at least 1")?;
    println!("published {count} events, the first is {first_idem}");

    write
        .write_all(
            format!("REPLAY;CLIENT_ID={client};EVENT_NAME={EVENT_NAME};FROM_POSITION={first_idem};LIMIT={count}\n")
                .as_bytes(),
        )
        .await?;
    let header = reply(&mut lines).await?;
    println!("{header}");
    let announced: usize = header
        .rsplit("COUNT=")
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("replay refused: {header}"))?;
    for _ in 0..announced {
        println!("{}", next_line(&mut lines).await?);
    }
    Ok(())
}
