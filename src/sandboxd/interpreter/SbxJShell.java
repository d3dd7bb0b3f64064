// The Java side of the code interpreter's Java kernel (java_kernel.py): evaluates snippets with the
// JDK's own JShell API, in this JVM ("local" execution: no second JVM), and answers one JSON line per
// event on stdout. Launched as a single-file source program (`java SbxJShell.java`).
//
// Protocol: each request is one line, the code in base64. Replies, one JSON object per line:
//   {"out": "..."}                      what the code printed (stdout and stderr)
//   {"value": "..."}                    the value of the last expression, as jshell shows it
//   {"error": "...", "name": "..."}     a compile error or an exception; evaluation stops there
//   {"done": true}                      end of the request
import java.io.ByteArrayOutputStream;
import java.io.BufferedReader;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.Base64;
import java.util.stream.Collectors;
import jdk.jshell.EvalException;
import jdk.jshell.JShell;
import jdk.jshell.Snippet;
import jdk.jshell.SnippetEvent;
import jdk.jshell.SourceCodeAnalysis;

public class SbxJShell {
    static PrintStream reply;

    static String json(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                default:
                    if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
                    else b.append(c);
            }
        }
        return b.append('"').toString();
    }

    static void send(String key, String value) {
        reply.println("{" + json(key) + ":" + json(value) + "}");
    }

    static void flush(ByteArrayOutputStream captured) {
        System.out.flush();
        System.err.flush();
        if (captured.size() > 0) {
            send("out", captured.toString(StandardCharsets.UTF_8));
            captured.reset();
        }
    }

    /** Expressions show their value (as a notebook cell does); declarations do not. */
    static boolean shows(Snippet snippet) {
        switch (snippet.subKind()) {
            case TEMP_VAR_EXPRESSION_SUBKIND:
            case VAR_VALUE_SUBKIND:
            case ASSIGNMENT_SUBKIND:
            case OTHER_EXPRESSION_SUBKIND:
                return true;
            default:
                return false;
        }
    }

    public static void main(String[] args) throws Exception {
        reply = new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);
        ByteArrayOutputStream captured = new ByteArrayOutputStream();
        PrintStream capture = new PrintStream(captured, true, StandardCharsets.UTF_8);
        JShell shell = JShell.builder().executionEngine("local").out(capture).err(capture).build();
        System.setOut(capture);
        System.setErr(capture);
        SourceCodeAnalysis analysis = shell.sourceCodeAnalysis();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            String remaining = new String(Base64.getDecoder().decode(line.trim()), StandardCharsets.UTF_8);
            String value = null;
            boolean failed = false;
            while (!failed && !remaining.isBlank()) {
                SourceCodeAnalysis.CompletionInfo info = analysis.analyzeCompletion(remaining);
                String source = info.source();
                if (source == null || info.completeness() == SourceCodeAnalysis.Completeness.DEFINITELY_INCOMPLETE) {
                    source = remaining;  // let the compiler say what is wrong with it
                    remaining = "";
                } else {
                    remaining = info.remaining();
                }
                for (SnippetEvent event : shell.eval(source)) {
                    if (event.exception() != null) {
                        Throwable e = event.exception();
                        String name = e instanceof EvalException ? ((EvalException) e).getExceptionClassName()
                                : e.getClass().getName();
                        flush(captured);
                        reply.println("{\"error\":" + json(String.valueOf(e.getMessage())) + ",\"name\":" + json(name) + "}");
                        failed = true;
                    } else if (event.status() == Snippet.Status.REJECTED) {
                        String diags = shell.diagnostics(event.snippet())
                                .map(d -> d.getMessage(null)).collect(Collectors.joining("\n"));
                        flush(captured);
                        reply.println("{\"error\":" + json(diags) + ",\"name\":\"CompilationError\"}");
                        failed = true;
                    } else if (event.value() != null && event.causeSnippet() == null && shows(event.snippet())) {
                        value = event.value();
                    }
                }
                flush(captured);
            }
            if (!failed && value != null) send("value", value);
            reply.println("{\"done\":true}");
        }
    }
}
