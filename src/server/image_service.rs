//! `runtime.v1.ImageService`: thin RPCs over [`crate::image::ImageManager`]; `ImageFsInfo`
//! answers from the filesystem usage cache ([`crate::stats::fs`]), and each pull is counted
//! in the Prometheus metrics.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cri::v1::image_service_server::ImageService;
use crate::cri::v1::{
    AuthConfig, FilesystemIdentifier, FilesystemUsage, Image, ImageFsInfoRequest,
    ImageFsInfoResponse, ImageSpec, ImageStatusRequest, ImageStatusResponse, Int64Value,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse, StreamImagesRequest, StreamImagesResponse, UInt64Value,
};
use crate::stats::fs::{FsSample, FsUsage};
use base64::Engine;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::trace::{deadline, rpc};
use crate::image::{Credentials, ImageManager, ImageRecord};

pub struct ImageServiceImpl {
    images: Arc<ImageManager>,
    /// The configured RuntimeClass handlers (an image pull may name one).
    handlers: Vec<String>,
    fs: Arc<FsUsage>,
}

impl ImageServiceImpl {
    pub fn new(
        images: Arc<ImageManager>,
        handlers: Vec<String>,
        fs: Arc<FsUsage>,
    ) -> ImageServiceImpl {
        ImageServiceImpl {
            images,
            handlers,
            fs,
        }
    }

    /// `ImageSpec.runtime_handler`: images are shared by every handler here, but an unknown
    /// one is rejected, as the CRI asks.
    fn check_handler(&self, spec: &Option<ImageSpec>) -> Result<(), Status> {
        let handler = spec
            .as_ref()
            .map(|s| s.runtime_handler.as_str())
            .unwrap_or("");
        if handler.is_empty() || self.handlers.iter().any(|h| h == handler) {
            return Ok(());
        }
        Err(Status::invalid_argument(format!(
            "unknown runtime handler {handler:?}: configured are {:?}",
            self.handlers
        )))
    }

    /// The images ListImages and StreamImages answer: all, or those `filter` names.
    fn list(&self, filter: &str) -> Vec<Image> {
        let images = if filter.is_empty() {
            self.images.list()
        } else {
            self.images.resolve(filter).into_iter().collect()
        };
        images.iter().map(to_cri).collect()
    }
}

/// The image a List or Stream filter names ("" for all).
fn filter_name(filter: &Option<crate::cri::v1::ImageFilter>) -> String {
    filter
        .as_ref()
        .map(|f| spec_name(&f.image).trim().to_string())
        .unwrap_or_default()
}

fn spec_name(spec: &Option<ImageSpec>) -> &str {
    spec.as_ref().map(|s| s.image.as_str()).unwrap_or("")
}

fn require_spec(spec: &Option<ImageSpec>) -> Result<&str, Status> {
    let name = spec_name(spec).trim();
    if name.is_empty() {
        return Err(Status::invalid_argument("an image reference is required"));
    }
    Ok(name)
}

/// CRI credentials: `auth` is base64 of `user:password`.
fn credentials(auth: &Option<AuthConfig>) -> Result<Credentials, Status> {
    let Some(a) = auth else {
        return Ok(Credentials::default());
    };
    let mut c = Credentials {
        username: a.username.clone(),
        password: a.password.clone(),
        registry_token: a.registry_token.clone(),
        identity_token: a.identity_token.clone(),
    };
    if c.username.is_empty() && !a.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .map_err(|e| Status::invalid_argument(format!("auth is not base64: {e}")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| Status::invalid_argument("auth is not UTF-8"))?;
        let (user, pass) = text
            .split_once(':')
            .ok_or_else(|| Status::invalid_argument("auth must encode user:password"))?;
        c.username = user.to_string();
        c.password = pass.to_string();
    }
    Ok(c)
}

/// The image config's `User` as CRI wants it: a numeric uid, or else a user name.
fn user_of(user: Option<&str>) -> (Option<Int64Value>, String) {
    let Some(u) = user else {
        return (None, String::new());
    };
    let name = u.split(':').next().unwrap_or("");
    match name.parse::<i64>() {
        Ok(uid) => (Some(Int64Value { value: uid }), String::new()),
        Err(_) => (None, name.to_string()),
    }
}

/// The CRI form of a filesystem's cached usage.
fn fs_usage(s: &FsSample) -> FilesystemUsage {
    FilesystemUsage {
        timestamp: s.at,
        fs_id: Some(FilesystemIdentifier {
            mountpoint: s.mountpoint.clone(),
        }),
        used_bytes: Some(UInt64Value {
            value: s.usage.bytes,
        }),
        inodes_used: Some(UInt64Value {
            value: s.usage.inodes,
        }),
    }
}

pub fn to_cri(r: &ImageRecord) -> Image {
    let (uid, username) = user_of(r.user.as_deref());
    Image {
        id: r.id.clone(),
        repo_tags: r.repo_tags.clone(),
        repo_digests: r.repo_digests.clone(),
        size: r.size,
        uid,
        username,
        spec: Some(ImageSpec {
            image: r.id.clone(),
            ..Default::default()
        }),
        pinned: r.pinned,
    }
}

#[tonic::async_trait]
impl ImageService for ImageServiceImpl {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let filter = filter_name(&req.filter);
        rpc("ListImages", &filter, deadline, async {
            Ok(ListImagesResponse {
                images: self.list(&filter),
            })
        })
        .await
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let name = spec_name(&req.image).to_string();
        rpc("ImageStatus", &name, deadline, async {
            let name = require_spec(&req.image)?;
            let Some(img) = self.images.resolve(name) else {
                return Ok(ImageStatusResponse::default());
            };
            let mut info = HashMap::new();
            if req.verbose {
                let dirs = self.images.snapshot_dirs(&img)?;
                let v = serde_json::json!({
                    "id": img.id,
                    "manifestDigest": img.manifest_digest,
                    "configDigest": img.config_digest,
                    "chainIds": img.layers.iter().map(|l| &l.chain_id).collect::<Vec<_>>(),
                    "layers": img.layers,
                    "snapshotDirs": dirs,
                    "config": self.images.config_json(&img)?,
                });
                info.insert("info".to_string(), v.to_string());
            }
            Ok(ImageStatusResponse {
                image: Some(to_cri(&img)),
                info,
            })
        })
        .await
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let name = spec_name(&req.image).to_string();
        rpc("PullImage", &name, deadline, async {
            let name = require_spec(&req.image)?;
            self.check_handler(&req.image)?;
            let creds = credentials(&req.auth)?;
            let started = std::time::Instant::now();
            let pulled = self.images.pull(name, &creds).await;
            let result = match &pulled {
                Ok(_) => "success",
                Err(e) => e.pull_result(),
            };
            crate::metrics::observe_pull(result, started.elapsed());
            // A pull's buffers (chunks in flight, inflate and tar state) are freed now.
            crate::alloc::trim_soon();
            let id = pulled?;
            // New snapshots are walked once, now: ImageFsInfo counts the image at once.
            self.fs.refresh_images_now().await;
            Ok(PullImageResponse { image_ref: id })
        })
        .await
    }

    type StreamImagesStream = BoxStream<StreamImagesResponse>;

    async fn stream_images(
        &self,
        request: Request<StreamImagesRequest>,
    ) -> Result<Response<Self::StreamImagesStream>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let filter = filter_name(&req.filter);
        rpc("StreamImages", &filter, deadline, async {
            Ok(super::list_stream::stream(self.list(&filter), |images| {
                StreamImagesResponse { images }
            }))
        })
        .await
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let deadline = deadline(&request);
        let req = request.into_inner();
        let name = spec_name(&req.image).to_string();
        rpc("RemoveImage", &name, deadline, async {
            let name = require_spec(&req.image)?;
            self.images.remove(name).await?;
            Ok(RemoveImageResponse {})
        })
        .await
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        rpc("ImageFsInfo", "", deadline(&_request), async {
            Ok(ImageFsInfoResponse {
                image_filesystems: vec![fs_usage(&self.fs.image())],
                container_filesystems: vec![fs_usage(&self.fs.containers())],
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_map_to_uid_or_name() {
        assert_eq!(
            user_of(Some("1002")),
            (Some(Int64Value { value: 1002 }), String::new())
        );
        assert_eq!(
            user_of(Some("1003:1003")),
            (Some(Int64Value { value: 1003 }), String::new())
        );
        assert_eq!(user_of(Some("www-data")), (None, "www-data".to_string()));
        assert_eq!(
            user_of(Some("www-data:adm")),
            (None, "www-data".to_string())
        );
        assert_eq!(user_of(None), (None, String::new()));
    }

    #[test]
    fn auth_field_is_decoded() {
        let a = AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("bob:secret"),
            ..Default::default()
        };
        let c = credentials(&Some(a)).expect("decodes");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("bob", "secret")
        );
        let bad = AuthConfig {
            auth: "!!!".to_string(),
            ..Default::default()
        };
        let e = credentials(&Some(bad))
            .err()
            .expect("bad base64 is refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
