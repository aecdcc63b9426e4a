package org.pytorch.serve.http.api.rest;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import io.netty.channel.ChannelHandlerContext;
import io.netty.handler.codec.http.FullHttpRequest;
import io.netty.handler.codec.http.HttpMethod;
import io.netty.handler.codec.http.HttpResponseStatus;
import io.netty.handler.codec.http.QueryStringDecoder;
import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.Map;
import org.pytorch.serve.archive.DownloadArchiveException;
import org.pytorch.serve.archive.model.ModelException;
import org.pytorch.serve.archive.model.ModelVersionNotFoundException;
import org.pytorch.serve.archive.workflow.WorkflowException;
import org.pytorch.serve.http.HttpRequestHandlerChain;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.NettyUtils;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.ModelVersionedRefs;
import org.pytorch.serve.wlm.WorkerInitializationException;
import org.pytorch.serve.wlm.WorkerState;
import org.pytorch.serve.wlm.WorkerThread;

/**
 * torchship's OIP v2 REST handler for TorchServe 0.12.0's inference port, loaded in place of the frontend's own class
 * of this name by torchship's Java agent (torchship.oip.Agent). The frontend puts it last in the inference chain
 * (ts_open_inference_protocol=true), so it sees only the paths no earlier handler took: infer and explain never reach
 * it, and the token check has already run.
 *
 * <p>It answers what TorchServe's own class answers (live, server metadata, the versions 501) and what that class
 * leaves to 404: model metadata ({@code GET /v2/models/<m>}, the archive's oip-metadata.json, written at archive time
 * by the same code that answers it on the Ray app) and model readiness ({@code GET /v2/models/<m>/ready}: its
 * workers have loaded it). Server readiness is real too: every model has a loaded worker and no drain has begun.
 * Statuses and error bodies ({"error": ...}) are the Ray app's.
 */
public class OpenInferenceProtocolRequestHandler extends HttpRequestHandlerChain {

    /** The archive entry holding the endpoint's OIP model metadata document (handlers.names.OIP_METADATA_FILE). */
    static final String METADATA_FILE = "oip-metadata.json";
    /** The handler's drain file (handlers.names.DRAIN_FILE_ENV): once it exists, the server is not ready. */
    static final String DRAIN_FILE_ENV = "TORCHSHIP_DRAIN_FILE";

    public OpenInferenceProtocolRequestHandler() {}

    @Override
    public void handleRequest(
            ChannelHandlerContext ctx,
            FullHttpRequest req,
            QueryStringDecoder decoder,
            String[] segments)
            throws ModelException, DownloadArchiveException, WorkflowException,
                    WorkerInitializationException {
        String path = String.join("/", segments).trim();
        boolean get = HttpMethod.GET.equals(req.method());
        boolean models = segments.length >= 4 && "v2".equals(segments[1]) && "models".equals(segments[2]);
        if ("/v2/health/live".equals(path)) {
            JsonObject live = new JsonObject();
            live.addProperty("live", true);
            NettyUtils.sendJsonResponse(ctx, live);
        } else if ("/v2/health/ready".equals(path)) {
            boolean ready = !draining() && allModelsReady();
            JsonObject body = new JsonObject();
            body.addProperty("ready", ready);
            NettyUtils.sendJsonResponse(ctx, body, ready ? HttpResponseStatus.OK : HttpResponseStatus.SERVICE_UNAVAILABLE);
        } else if ("/v2".equals(path)) {
            sendServerMetadata(ctx);
        } else if (models && segments.length == 4) {
            sendModelMetadata(ctx, segments[3], get);
        } else if (models && segments.length == 5 && "ready".equals(segments[4])) {
            sendModelReady(ctx, segments[3], get);
        } else if (segments.length > 5 && path.contains("/versions")) {
            sendError(ctx, HttpResponseStatus.NOT_IMPLEMENTED, "Model versioning is not yet supported.");
        } else {
            chain.handleRequest(ctx, req, decoder, segments);
        }
    }

    /** TorchServe's own server metadata document, as its class answers it (its key spelling included). */
    private static void sendServerMetadata(ChannelHandlerContext ctx) {
        JsonArray extensions = new JsonArray();
        extensions.add("kserve");
        extensions.add("kubeflow");
        JsonObject body = new JsonObject();
        body.addProperty("name", "Torchserve");
        body.addProperty("version", ConfigManager.getInstance().getVersion());
        body.add("extenstion", extensions);
        NettyUtils.sendJsonResponse(ctx, body);
    }

    private static void sendModelMetadata(ChannelHandlerContext ctx, String name, boolean get) {
        Model model = modelOrError(ctx, name, get);
        if (model == null) {
            return;
        }
        File file = new File(model.getModelDir(), METADATA_FILE);
        if (!file.isFile()) {
            NettyUtils.sendJsonResponse(ctx, foreignMetadata(name, model.getVersion()));
            return;
        }
        String document;
        try {
            document = new String(Files.readAllBytes(file.toPath()), StandardCharsets.UTF_8).trim();
        } catch (IOException e) {
            sendError(ctx, HttpResponseStatus.INTERNAL_SERVER_ERROR, "cannot read " + name + "'s " + METADATA_FILE);
            return;
        }
        NettyUtils.sendJsonResponse(ctx, document, HttpResponseStatus.OK);
    }

    /**
     * An archive torchship did not build says nothing of its tensors: its handler takes the request body and answers
     * whatever it returns. The Ray app answers the same document (torchship.archive.foreign.oip_metadata).
     */
    static JsonObject foreignMetadata(String name, String version) {
        JsonObject body = new JsonObject();
        body.addProperty("name", name);
        JsonArray versions = new JsonArray();
        versions.add(version);
        body.add("versions", versions);
        body.addProperty("platform", "torchserve_handler");
        body.add("inputs", bytesTensor("body"));
        body.add("outputs", bytesTensor("output"));
        return body;
    }

    private static JsonArray bytesTensor(String name) {
        JsonObject tensor = new JsonObject();
        tensor.addProperty("name", name);
        tensor.addProperty("datatype", "BYTES");
        JsonArray shape = new JsonArray();
        shape.add(-1);
        tensor.add("shape", shape);
        JsonArray list = new JsonArray();
        list.add(tensor);
        return list;
    }

    private static void sendModelReady(ChannelHandlerContext ctx, String name, boolean get) {
        Model model = modelOrError(ctx, name, get);
        if (model == null) {
            return;
        }
        boolean ready = ready(model);
        JsonObject body = new JsonObject();
        body.addProperty("name", name);
        body.addProperty("ready", ready);
        NettyUtils.sendJsonResponse(ctx, body, ready ? HttpResponseStatus.OK : HttpResponseStatus.SERVICE_UNAVAILABLE);
    }

    /** The model a GET names; otherwise null, once the 405 (not a GET) or the 404 (no such model) is sent. */
    private static Model modelOrError(ChannelHandlerContext ctx, String name, boolean get) {
        if (!get) {
            sendError(ctx, HttpResponseStatus.METHOD_NOT_ALLOWED, "use GET");
            return null;
        }
        Model model = defaultModel(name);
        if (model == null) {
            sendError(ctx, HttpResponseStatus.NOT_FOUND, "Model not found: " + name);
        }
        return model;
    }

    /** The default version of a registered model, or null when no model has that name. */
    private static Model defaultModel(String name) {
        try {
            return ModelManager.getInstance().getModel(name, null);
        } catch (ModelVersionNotFoundException e) {
            return null;
        }
    }

    /**
     * A model is ready when max(1, minWorkers) of its workers have loaded it: the rule of the management API's READY
     * workers that the launcher and the pods' readiness probe apply (deploy/probe.py).
     */
    private static boolean ready(Model model) {
        int loaded = 0;
        for (WorkerThread worker : ModelManager.getInstance().getWorkers(model.getModelVersionName())) {
            if (worker.getState() == WorkerState.WORKER_MODEL_LOADED) {
                loaded += 1;
            }
        }
        return loaded >= Math.max(1, model.getMinWorkers());
    }

    private static boolean allModelsReady() {
        for (Map.Entry<String, ModelVersionedRefs> entry : ModelManager.getInstance().getAllModels()) {
            Model model = entry.getValue().getDefaultModel();
            if (model == null || !ready(model)) {
                return false;
            }
        }
        return true;
    }

    private static boolean draining() {
        String drainFile = System.getenv(DRAIN_FILE_ENV);
        return drainFile != null && !drainFile.isEmpty() && new File(drainFile).exists();
    }

    private static void sendError(ChannelHandlerContext ctx, HttpResponseStatus status, String message) {
        JsonObject body = new JsonObject();
        body.addProperty("error", message);
        NettyUtils.sendJsonResponse(ctx, body, status);
    }
}
