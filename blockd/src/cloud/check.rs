//! `repo check` of a location (the work is [`crate::repo::check`]).

use blockd_api::{CheckReport, CheckRequest, Subset};

use super::{Cloud, CloudError};
use crate::claims::Want;

impl Cloud {
    /// Checks a location's repository: every snapshot's objects, and with
    /// `read_data` every record of the chosen packs.
    ///
    /// # Errors
    /// Unknown location, a bad subset, provider failures. Damage is in
    /// the report, not an error.
    pub async fn check(&self, req: CheckRequest) -> Result<CheckReport, CloudError> {
        let subset = match &req.subset {
            Some(s) if !req.read_data => {
                return Err(CloudError::BadSubset {
                    why: format!("--subset {s} needs --read-data"),
                })
            }
            Some(s) => Some(
                s.parse::<Subset>()
                    .map_err(|why| CloudError::BadSubset { why })?,
            ),
            None => None,
        };
        let location = self.locations.resolve(req.location.as_deref())?;
        let _claim = self.claims.acquire(Want::for_location_use(
            &location,
            "are being checked (`blockctl repo check`)",
            "wait for the check to end",
        ))?;
        let repo = self.locations.repo(&location).await?;
        let report = crate::repo::check::check(&repo, req.read_data, subset)
            .await
            .inspect_err(|_| crate::metrics::STATS.maintenance(&location, "check", "failed"))?;
        crate::metrics::STATS.maintenance(
            &location,
            "check",
            if report.problems.is_empty() && report.damaged.is_empty() {
                "clean"
            } else {
                "damaged"
            },
        );
        tracing::info!(
            %location,
            snapshots = report.snapshots,
            problems = report.problems.len(),
            damaged = report.damaged.len(),
            "repository checked"
        );
        Ok(report)
    }
}
