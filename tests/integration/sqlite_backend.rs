//! The SQLite backend of the integration harness: each test database is a
//! fresh file in the test's temporary folder. Test crates that include
//! `helpers.rs` declare this file (or another backend) as `mod backend`.

use std::path::Path;

use crate::helpers::fresh_database_url;

/// A fresh, empty database for one test.
pub struct TestDatabase {
    pub url: String,
}

/// Creates a database for one test as a new file in `dir`, which must
/// outlive the returned [`TestDatabase`].
pub async fn fresh_database(dir: &Path) -> TestDatabase {
    TestDatabase {
        url: fresh_database_url(dir).await,
    }
}
