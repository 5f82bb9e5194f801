//! `meridian serve`: open the region and serve HTTP until SIGTERM/SIGINT.

use crate::affinity;
use crate::api;
use crate::config::Config;
use crate::region::Region;
use crate::startup::StartupPort;
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tracing_actix_web::TracingLogger;

/// Runs one region until it is asked to stop. In-flight requests finish before it exits.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.listen;
    let workers = config.worker_threads();
    // Listening for SIGTERM/SIGINT from the start: a stop while the region starts, or as soon
    // as it answers, would otherwise meet the default action (death, no checkpoint), since
    // actix-web registers its own handlers only once its server runs.
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    // The port is taken before anything starts, so a port in use is a plain error; it only
    // accepts connections once the region can serve them (until then, they are refused) or
    // answer peers' start-up questions.
    let mut port =
        StartupPort::reserve(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let (name, dir) = (config.region.clone(), config.data_dir.clone());
    let opened = tokio::select! {
        opened = Region::open(config, &mut port) => opened,
        _ = terminate.recv() => return stopped_while_starting(),
        _ = interrupt.recv() => return stopped_while_starting(),
    };
    let region = opened.with_context(|| {
        format!(
            "cannot start region {name} on data directory {}",
            dir.display()
        )
    })?;
    let region = web::Data::new(region);
    let identity = region.storage.identity().clone();
    tracing::info!(
        region = %identity.region,
        cluster = %identity.cluster_id,
        incarnation = %identity.incarnation,
        last_seq = region.storage.last_seq(),
        %listen,
        "region ready"
    );
    let openapi = Arc::new(api::openapi::document());
    let app_region = region.clone();
    let max_batch_bytes = region.config.max_peer_body_bytes();
    let pins = affinity::worker_cpus(region.config.pin_workers, workers);
    if let Some(cpus) = &pins {
        let cpus: Vec<usize> = cpus.iter().map(|c| c.id).collect();
        tracing::info!(?cpus, "HTTP workers pinned one per CPU");
    }
    let started_workers = Arc::new(AtomicUsize::new(0));
    let partitions_on_worker = region.config.partition_threads() == 0;
    let server = HttpServer::new(move || {
        // Runs on each worker's own thread as it starts (again if one restarts).
        if let Some(cpus) = &pins {
            let cpu = cpus[started_workers.fetch_add(1, Ordering::Relaxed) % cpus.len()];
            if !affinity::pin_current_thread(cpu) {
                tracing::warn!(cpu = cpu.id, "could not pin an HTTP worker to its CPU");
            }
        }
        if partitions_on_worker {
            app_region.partitions.start_here();
        }
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
    .with_context(|| format!("cannot listen on {listen}"))?;
    // The start-up responder stops before the region's server accepts: connections that
    // arrive meanwhile wait in the backlog, and none is answered "starting" by mistake.
    port.retire().await;
    let server = server.run();
    let handle = server.handle();
    // Background actors send to the partition actors: on the worker's thread, those start
    // with it, once the server runs.
    let background = region.clone().into_inner();
    actix_web::rt::spawn(async move {
        background.partitions.started().await;
        background.start_background();
    });
    actix_web::rt::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("stop requested; finishing requests in flight");
        handle.stop(true).await;
    });
    server.await.context("HTTP server failed")?;
    if let Err(error) = region.storage.checkpoint().await {
        tracing::warn!(%error, "no checkpoint at stop; the journal is replayed at the next start");
    }
    tracing::info!("region stopped");
    Ok(())
}

/// A stop asked for before the region served: nothing was accepted, nothing to finish.
fn stopped_while_starting() -> anyhow::Result<()> {
    tracing::info!("stop requested while starting; nothing was served");
    Ok(())
}
