//! `meridian serve`: open the region and serve HTTP until SIGTERM/SIGINT.

use crate::api;
use crate::config::Config;
use crate::region::Region;
use crate::startup::StartupPort;
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tracing_actix_web::TracingLogger;

/// Runs one region until it is asked to stop. In-flight requests finish before it exits.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let workers = config.worker_threads();
    // The port is taken before anything starts, so a port in use is a plain error; it only
    // accepts connections once the region can serve them (until then, they are refused) or
    // answer peers' start-up questions.
    let mut port =
        StartupPort::reserve(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let (name, dir) = (config.region.clone(), config.data_dir.clone());
    let region = Region::open(config, &mut port).await.with_context(|| {
        format!(
            "cannot start region {name} on data directory {}",
            dir.display()
        )
    })?;
    let region = web::Data::new(region);
    region.clone().into_inner().start_background();
    let identity = region.storage.identity().clone();
    tracing::info!(
        region = %identity.region,
        cluster = %identity.cluster_id,
        incarnation = %identity.incarnation,
        last_seq = region.storage.last_seq(),
        %listen,
        "region ready"
    );
    // Listening for SIGTERM/SIGINT from before the port opens: a stop that arrives as soon as
    // the region answers would otherwise meet the default action (death, no checkpoint),
    // since actix-web registers its own handlers only once its server runs.
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let openapi = Arc::new(api::openapi::document());
    let app_region = region.clone();
    let max_batch_bytes = region.config.max_peer_body_bytes();
    let server = HttpServer::new(move || {
        let openapi = openapi.clone();
        App::new()
            .app_data(app_region.clone())
            .app_data(web::Data::new(crate::api::forward::PeerClient(
                crate::peers::http_client(),
            )))
            .wrap(from_fn(api::record_metrics))
            .wrap(TracingLogger::<api::trace::RegionRootSpan>::new())
            .configure(|cfg| api::configure(cfg, openapi, max_batch_bytes))
            .default_service(web::to(api::not_found))
    })
    .workers(workers)
    .shutdown_timeout(10)
    .disable_signals()
    .listen(
        port.listen()
            .and_then(|l| l.try_clone())
            .with_context(|| format!("cannot listen on {listen}"))?,
    )
    .with_context(|| format!("cannot listen on {listen}"))?
    .run();
    let handle = server.handle();
    let server = actix_web::rt::spawn(server);
    // Connections that arrive meanwhile wait in the backlog for the region's server.
    port.retire().await;
    actix_web::rt::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("stop requested; finishing requests in flight");
        handle.stop(true).await;
    });
    server
        .await
        .context("HTTP server stopped")?
        .context("HTTP server failed")?;
    if let Err(error) = region.storage.checkpoint().await {
        tracing::warn!(%error, "no checkpoint at stop; the journal is replayed at the next start");
    }
    tracing::info!("region stopped");
    Ok(())
}
