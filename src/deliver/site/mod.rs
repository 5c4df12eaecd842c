//! `mode = "commerceml"`: delivery to a site's CommerceML endpoint as 1C's site exchange
//! does it (docs/commerceml.md "lxbridge as 1C"). A batch is one package: `import.xml`
//! (groups, properties, products) and `offers.xml` (offers), rendered by
//! [`crate::commerceml::package`], sent in one exchange: init, the files (one zip when the
//! site asks for it) in parts of at most `file_limit`, then `mode=import` of each file
//! while the site answers `progress` (within `import_rounds` and `import_time`).
//!
//! Fate: `success` for every file delivers the whole package; a `failure`, or any other
//! first line (named in the error), fails it whole, so [`super::push`] retries its changes
//! alone, which finds the one the site can't take and dead-letters it with the site's text.
//! The site unreachable (or 5xx) holds the package behind the breaker. The session
//! ([`session`]) is kept while the site accepts it, and renewed once per package on a 401
//! or a `failure` that speaks of the session. Orders: [`orders`].

pub mod orders;
mod session;

use super::{Answer, Item};
use crate::commerceml::package::{import_file, offers_file, Ids};
use crate::commerceml::{Written, GROUP, OFFER, PRODUCT, PROPERTY};
use crate::config::DeliverConfig;
use session::{Client, Failure, Kind, Status};
use std::time::{Duration, Instant};

/// The types a package carries, in the order of its files.
const KINDS: [&str; 4] = [GROUP, PROPERTY, PRODUCT, OFFER];

/// What a package's exchange came to, for [`super::push`].
pub(crate) enum Sent {
    Delivered(Answer),
    Unreachable(String),
    Refused(String),
}

/// A CommerceML site as a push target's wire.
pub struct Site {
    client: Client,
    rounds: u32,
    import_time: Duration,
    catalog_id: String,
    classifier_id: String,
}

/// The files of one package, named as 1C names them.
struct Package {
    files: Vec<(&'static str, Vec<u8>)>,
}

impl Site {
    pub fn new(target: &str, d: &DeliverConfig) -> Result<Site, super::DeliverError> {
        Ok(Site {
            client: Client::new(target, d)?,
            rounds: d.import_rounds,
            import_time: d.import_time.0,
            catalog_id: d.catalog_id.clone(),
            classifier_id: d.classifier_id.clone(),
        })
    }

    /// Sends `items` as one package; the changes of other types are refused on their own.
    pub(crate) async fn send(&self, items: &[Item]) -> Sent {
        let (package, answer) = self.package(items);
        if package.files.is_empty() {
            return Sent::Delivered(answer);
        }
        let mut renewed = false;
        loop {
            match self.exchange(&package).await {
                Ok(()) => return Sent::Delivered(answer),
                Err(Failure::Renew(why)) if !renewed => {
                    tracing::info!(target = %self.client.target, %why, "CommerceML session renewed");
                    self.client.forget_session().await;
                    renewed = true;
                }
                Err(Failure::Renew(why) | Failure::Refused(why)) => return Sent::Refused(why),
                Err(Failure::Unreachable(why)) => return Sent::Unreachable(why),
            }
        }
    }

    /// The package's files, and the answer refusing what can't be in one.
    fn package(&self, items: &[Item]) -> (Package, Answer) {
        let changes = super::outgoing(items);
        let parsed: Vec<Option<serde_json::Value>> = changes
            .iter()
            .map(|c| c.data.and_then(|d| serde_json::from_str(d.get()).ok()))
            .collect();
        let mut answer = Answer::default();
        let mut by_kind: [Vec<Written<'_>>; 4] = Default::default();
        for (c, data) in changes.iter().zip(&parsed) {
            let Some(slot) = KINDS.iter().position(|k| *k == c.kind) else {
                let why = format!(
                    "type {:?} is not sent by CommerceML (only CommerceML.Группа, Свойство, Товар, Предложение): map it to one in the route",
                    c.kind
                );
                answer.refuse(c.id, why, false);
                continue;
            };
            by_kind[slot].push(Written {
                name: crate::commerceml::element_name(c.kind),
                reference: c.reference,
                deleted: c.op == crate::model::Op::Delete,
                data: data.as_ref(),
            });
        }
        let files = self.render(&by_kind);
        (Package { files }, answer)
    }

    fn render(&self, by_kind: &[Vec<Written<'_>>; 4]) -> Vec<(&'static str, Vec<u8>)> {
        let [groups, properties, products, offers] = by_kind;
        let ids = Ids {
            catalog: &self.catalog_id,
            classifier: &self.classifier_id,
        };
        let formed = crate::clock::rfc3339_now();
        let formed = &formed[..19.min(formed.len())];
        let mut files = Vec::new();
        if !(groups.is_empty() && properties.is_empty() && products.is_empty()) {
            files.push((
                "import.xml",
                import_file(groups, properties, products, formed, ids),
            ));
        }
        if !offers.is_empty() {
            files.push(("offers.xml", offers_file(offers, formed, ids)));
        }
        files
    }

    /// init, upload, import: the package's exchange in the kept session.
    async fn exchange(&self, package: &Package) -> Result<(), Failure> {
        let init = self.client.init(Kind::Catalog).await?;
        if init.zip {
            let archive = zip(&package.files);
            self.client
                .upload(Kind::Catalog, "lxbridge.zip", &archive, init.file_limit)
                .await?;
        } else {
            for (name, bytes) in &package.files {
                self.client
                    .upload(Kind::Catalog, name, bytes, init.file_limit)
                    .await?;
            }
        }
        for (name, _) in &package.files {
            self.import(name).await?;
        }
        Ok(())
    }

    /// `mode=import` of `name` while the site answers `progress`, within the bounds.
    async fn import(&self, name: &str) -> Result<(), Failure> {
        let started = Instant::now();
        for round in 0.. {
            let reply = self
                .client
                .call(Kind::Catalog, "import", Some(name), None)
                .await?;
            match reply.status(&format!("mode=import of {name}"))? {
                Status::Success => return Ok(()),
                Status::Progress if round >= self.rounds => {
                    return Err(Failure::Refused(format!(
                        "the site still answered progress to mode=import of {name} after {} rounds (import_rounds)",
                        self.rounds
                    )))
                }
                Status::Progress if started.elapsed() > self.import_time => {
                    return Err(Failure::Refused(format!(
                        "the site still answered progress to mode=import of {name} after {:?} (import_time)",
                        self.import_time
                    )))
                }
                Status::Progress => continue,
            }
        }
        unreachable!("the rounds are bounded")
    }
}

/// One zip archive of the files (deflate), as 1C sends it when the site says `zip=yes`.
fn zip(files: &[(&'static str, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut archive = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in files {
        archive
            .start_file(*name, options)
            .and_then(|()| archive.write_all(bytes).map_err(Into::into))
            .expect("writing a zip into memory");
    }
    archive
        .finish()
        .expect("finishing a zip in memory")
        .into_inner()
}
