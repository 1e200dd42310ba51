//! The node's content-addressed image store: kernels, initrds and disk images kept as files named
//! by the SHA-256 of their bytes (`DATA_DIR/images/blobs/sha256-<hex>`, read-only). Bytes arrive
//! as a stream (an upload, or a copy fetched from a peer) and are hashed while they are written
//! to a temporary file, which becomes the blob only once complete (and, for a fetch, only if it
//! has the digest asked for): a blob file is never partial or wrong.
//!
//! What the cluster knows of images (which exist, who holds them) is in the replicated state;
//! this module only keeps the local files.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

/// The largest image accepted (a disk image of several GiB fits).
pub const MAX_IMAGE: u64 = 64 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is over {max} bytes", max = MAX_IMAGE)]
    TooLarge,
    #[error("the image is empty")]
    Empty,
    #[error("the copy has digest {got}, not {want}")]
    DigestMismatch { want: String, got: String },
    #[error("the upload was cut off")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot write the image store")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

/// `sha256:<hex>` to the blob's file name.
fn file_name(digest: &str) -> Option<String> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| format!("sha256-{hex}"))
}

impl ImageStore {
    /// Opens (creating) the store under `dir` and removes uploads a crash left unfinished.
    pub fn open(dir: &Path) -> std::io::Result<ImageStore> {
        std::fs::create_dir_all(dir.join("blobs"))?;
        let tmp = dir.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        Ok(ImageStore { dir: dir.to_path_buf() })
    }

    /// The blob's path, whether or not it is here.
    pub fn path(&self, digest: &str) -> Option<PathBuf> {
        file_name(digest).map(|f| self.dir.join("blobs").join(f))
    }

    pub fn has(&self, digest: &str) -> bool {
        self.path(digest).is_some_and(|p| p.is_file())
    }

    /// Every blob here: (digest, size).
    pub fn list(&self) -> Vec<(String, u64)> {
        let Ok(rd) = std::fs::read_dir(self.dir.join("blobs")) else { return Vec::new() };
        let mut out: Vec<(String, u64)> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let hex = name.strip_prefix("sha256-")?;
                Some((format!("sha256:{hex}"), e.metadata().ok()?.len()))
            })
            .collect();
        out.sort();
        out
    }

    pub fn remove(&self, digest: &str) {
        if let Some(p) = self.path(digest) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Writes a body to the store; returns its digest and size. With `expect`, the bytes must
    /// have that digest (a copy from a peer), else nothing is kept.
    pub async fn ingest<B>(&self, mut body: B, expect: Option<&str>) -> Result<(String, u64), ImageError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tmp = self.dir.join("tmp").join(format!("{:016x}", rand::random::<u64>()));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ImageError::Body(e.into()))?;
                let Ok(data) = frame.into_data() else { continue };
                size += data.len() as u64;
                if size > MAX_IMAGE {
                    return Err(ImageError::TooLarge);
                }
                hasher.update(&data);
                file.write_all(&data).await?;
            }
            if size == 0 {
                return Err(ImageError::Empty);
            }
            file.sync_all().await?;
            let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
            if let Some(want) = expect {
                if want != digest {
                    return Err(ImageError::DigestMismatch { want: want.to_string(), got: digest });
                }
            }
            Ok((digest, size))
        }
        .await;
        match result {
            Ok((digest, size)) => {
                let dest = self.path(&digest).ok_or_else(|| std::io::Error::other("bad digest"))?;
                let mut perms = std::fs::metadata(&tmp)?.permissions();
                std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
                std::fs::set_permissions(&tmp, perms)?;
                // Same bytes, same name: a blob already here is identical.
                std::fs::rename(&tmp, &dest)?;
                Ok((digest, size))
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// Why a copy from a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    #[error("{addr} answered {status}")]
    Status { addr: String, status: u16 },
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// Copies an image from the node whose API is at `addr`, verifying its digest; returns its size.
pub async fn fetch(
    store: &ImageStore,
    addr: &str,
    token: &str,
    digest: &str,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Result<u64, FetchError> {
    let res = crate::peer::get(addr, &format!("/v1/images/{digest}/blob"), token, tls).await?;
    if res.status() != hyper::StatusCode::OK {
        return Err(FetchError::Status { addr: addr.to_string(), status: res.status().as_u16() });
    }
    let (_, size) = store.ingest(res.into_body(), Some(digest)).await?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[tokio::test]
    async fn blobs_are_named_by_their_digest_and_a_wrong_copy_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let (digest, size) = store.ingest(Full::new(Bytes::from_static(b"kernel bytes")), None).await.unwrap();
        assert_eq!(size, 12);
        assert_eq!(digest, format!("sha256:{}", hex::encode(Sha256::digest(b"kernel bytes"))));
        assert!(store.has(&digest));
        assert_eq!(std::fs::read(store.path(&digest).unwrap()).unwrap(), b"kernel bytes");
        // The same bytes again: the same blob.
        assert_eq!(store.ingest(Full::new(Bytes::from_static(b"kernel bytes")), None).await.unwrap().0, digest);
        assert_eq!(store.list(), vec![(digest.clone(), 12)]);
        // A copy with other bytes than the digest promised is refused and leaves nothing.
        let other = format!("sha256:{}", "0".repeat(64));
        let r = store.ingest(Full::new(Bytes::from_static(b"tampered")), Some(&other)).await;
        assert!(matches!(r, Err(ImageError::DigestMismatch { .. })), "{r:?}");
        assert!(!store.has(&other));
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(matches!(store.ingest(Full::new(Bytes::new()), None).await, Err(ImageError::Empty)));
        assert_eq!(store.path("sha256:../../etc/passwd"), None);
    }
}
