package torchship.oip;

import java.io.IOException;
import java.io.InputStream;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.ProtectionDomain;

/**
 * A Java agent ({@code -javaagent:torchship-oip.jar} in TorchServe's vmargs) that loads torchship's OIP v2 REST
 * handler in place of TorchServe's class of the same name when the frontend first uses it. The replacement is
 * made only when the class being loaded is TorchServe 0.12.0's (its sha256 below): any other TorchServe keeps its
 * own class, and the agent says so on stderr.
 */
public final class Agent {

    static final String TARGET = "org/pytorch/serve/http/api/rest/OpenInferenceProtocolRequestHandler";
    /** The compiled replacement, stored in this jar under a name no class loader looks up. */
    static final String REPLACEMENT = "torchship/oip/OpenInferenceProtocolRequestHandler.bytes";
    /** sha256 of TorchServe 0.12.0's own class (ts/frontend/model-server.jar), the one the replacement was written for. */
    static final String EXPECTED_SHA256 = "b267a0bb73ad5f8ebcf2885ef3337d9ed6fbb0640201d3ca74bd9b140a226593";

    private Agent() {}

    public static void premain(String args, Instrumentation instrumentation) throws IOException {
        byte[] replacement;
        try (InputStream in = Agent.class.getClassLoader().getResourceAsStream(REPLACEMENT)) {
            if (in == null) {
                throw new IOException("torchship OIP agent: " + REPLACEMENT + " is missing from its jar");
            }
            replacement = in.readAllBytes();
        }
        instrumentation.addTransformer(new Replace(replacement));
    }

    static String sha256(byte[] data) {
        try {
            StringBuilder hex = new StringBuilder();
            for (byte b : MessageDigest.getInstance("SHA-256").digest(data)) {
                hex.append(String.format("%02x", b));
            }
            return hex.toString();
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    static final class Replace implements ClassFileTransformer {
        private final byte[] replacement;

        Replace(byte[] replacement) {
            this.replacement = replacement;
        }

        @Override
        public byte[] transform(
                ClassLoader loader,
                String className,
                Class<?> redefined,
                ProtectionDomain domain,
                byte[] original) {
            if (!TARGET.equals(className) || redefined != null) {
                return null;
            }
            String found = sha256(original);
            if (!EXPECTED_SHA256.equals(found)) {
                System.err.println(
                        "torchship OIP agent: TorchServe's " + TARGET + " is not 0.12.0's (sha256 " + found
                                + "); kept as is: GET /v2/models/<m> and /ready are not served");
                return null;
            }
            System.err.println("torchship OIP agent: serving OIP model metadata and readiness on the inference port");
            return replacement.clone();
        }
    }
}
