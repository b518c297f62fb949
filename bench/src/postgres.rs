//! A fresh PostgreSQL schema per run, so runs share no state and the bench
//! drops only what it created.

use anyhow::Context;
use tokio_postgres::NoTls;

/// A schema that this process created.
pub struct Schema {
    server_url: String,
    pub name: String,
}

impl Schema {
    /// Creates a schema named `bench_<random hex>` on the server.
    pub async fn create(server_url: &str) -> anyhow::Result<Schema> {
        let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
        execute(server_url, &format!("CREATE SCHEMA {name}")).await?;
        Ok(Schema {
            server_url: server_url.to_owned(),
            name,
        })
    }

    /// Returns the server URL with `search_path` set to this schema through
    /// the libpq `options` parameter.
    pub fn service_url(&self) -> String {
        let separator = if self.server_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{separator}options=-c%20search_path%3D{}",
            self.server_url, self.name
        )
    }

    /// Drops the schema with everything in it.
    pub async fn drop(self) -> anyhow::Result<()> {
        execute(
            &self.server_url,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        )
        .await
    }
}

async fn execute(server_url: &str, statement: &str) -> anyhow::Result<()> {
    let (client, connection) = tokio_postgres::connect(server_url, NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {server_url}"))?;
    let connection = tokio::spawn(connection);
    client
        .batch_execute(statement)
        .await
        .with_context(|| format!("running `{statement}`"))?;
    drop(client);
    let _ = connection.await;
    Ok(())
}
