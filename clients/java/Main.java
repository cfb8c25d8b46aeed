// A Java client of the example app (examples/contacts_app.py), built only from the files
// `nexus proto export` writes: protoc's Java generator and grpc-java's plugin generate its
// classes without extra flags (the exported files carry java_package and
// java_multiple_files). See clients/java/README.md.
//
// It runs the create_contact workflow, streams search_contacts, creates and lists
// contacts through the typed ContactService with a filter, and reads an error's
// google.rpc.ErrorInfo. It prints one JSON document (the steps' results) on stdout;
// tests/proto/test_export_clients.py builds and runs it.

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.MessageOrBuilder;
import com.google.protobuf.Struct;
import com.google.protobuf.Value;
import com.google.protobuf.util.JsonFormat;
import com.google.rpc.ErrorInfo;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.StatusRuntimeException;
import io.nexus.models.v1.Contact;
import io.nexus.models.v1.ContactServiceGrpc;
import io.nexus.models.v1.CreateContactRequest;
import io.nexus.models.v1.GetContactRequest;
import io.nexus.models.v1.ListContactsRequest;
import io.nexus.workflow.v1.ExecuteWorkflowRequest;
import io.nexus.workflow.v1.ExecutionEvent;
import io.nexus.workflow.v1.StreamExecutionRequest;
import io.nexus.workflow.v1.WorkflowServiceGrpc;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.List;
import java.util.concurrent.TimeUnit;

public final class Main {
  private static final JsonFormat.Printer JSON =
      JsonFormat.printer().preservingProtoFieldNames().omittingInsignificantWhitespace();
  private static final Metadata.Key<byte[]> STATUS_DETAILS =
      Metadata.Key.of("grpc-status-details-bin", Metadata.BINARY_BYTE_MARSHALLER);

  private static String json(MessageOrBuilder message) throws InvalidProtocolBufferException {
    return JSON.print(message);
  }

  private static String quote(String text) {
    return "\"" + text.replace("\\", "\\\\").replace("\"", "\\\"") + "\"";
  }

  private static Value text(String value) {
    return Value.newBuilder().setStringValue(value).build();
  }

  private static String arg(String[] args, String name, String fallback) {
    for (int i = 0; i + 1 < args.length; i++) {
      if (args[i].equals("--" + name)) {
        return args[i + 1];
      }
    }
    return fallback;
  }

  public static void main(String[] args) throws Exception {
    String server = arg(args, "server", "127.0.0.1:50051");
    String name = arg(args, "name", "Ada Lovelace");
    String email = arg(args, "email", "ada@example.org");
    ManagedChannel channel = ManagedChannelBuilder.forTarget(server).usePlaintext().build();
    try {
      WorkflowServiceGrpc.WorkflowServiceBlockingStub workflows =
          WorkflowServiceGrpc.newBlockingStub(channel).withDeadlineAfter(20, TimeUnit.SECONDS);
      ContactServiceGrpc.ContactServiceBlockingStub contacts =
          ContactServiceGrpc.newBlockingStub(channel).withDeadlineAfter(20, TimeUnit.SECONDS);
      StringBuilder out = new StringBuilder("{");

      // a workflow: create_contact
      Struct inputs =
          Struct.newBuilder().putFields("name", text(name)).putFields("email", text(email)).build();
      out.append("\"execution\":")
          .append(json(workflows.executeWorkflow(
              ExecuteWorkflowRequest.newBuilder().setName("create_contact").setInputs(inputs).build())));

      // a stream: search_contacts finds that contact
      List<String> events = new ArrayList<>();
      Iterator<ExecutionEvent> stream = workflows.streamExecution(
          StreamExecutionRequest.newBuilder()
              .setName("search_contacts")
              .setInputs(Struct.newBuilder().putFields("query", text(name)))
              .build());
      while (stream.hasNext() && events.size() < 100) {
        events.add(json(stream.next()));
      }
      out.append(",\"events\":[").append(String.join(",", events)).append("]");

      // typed CRUD: create a contact, then list with a filter
      Contact created = contacts.createContact(CreateContactRequest.newBuilder()
          .setContact(Contact.newBuilder()
              .setName("Grace Hopper").setEmail("gh." + email)
              .setCompany("Analytical Engines").setScore(7))
          .build());
      out.append(",\"created\":").append(json(created));
      Struct atLeastFive = Struct.newBuilder()
          .putFields("$gte", Value.newBuilder().setNumberValue(5).build()).build();
      Struct filter = Struct.newBuilder()
          .putFields("email", text("gh." + email))
          .putFields("score", Value.newBuilder().setStructValue(atLeastFive).build())
          .build();
      out.append(",\"listed\":").append(json(contacts.listContacts(
          ListContactsRequest.newBuilder().setFilter(filter).setOrderBy("name").build())));

      // an error with details: a contact that does not exist
      try {
        contacts.getContact(GetContactRequest.newBuilder().setId("no-such-contact").build());
        throw new IllegalStateException("GetContact: expected an error");
      } catch (StatusRuntimeException e) {
        String reason = "";
        String domain = "";
        byte[] raw = e.getTrailers() == null ? null : e.getTrailers().get(STATUS_DETAILS);
        if (raw != null) {
          for (Any detail : com.google.rpc.Status.parseFrom(raw).getDetailsList()) {
            if (detail.is(ErrorInfo.class)) {
              ErrorInfo info = detail.unpack(ErrorInfo.class);
              reason = info.getReason();
              domain = info.getDomain();
            }
          }
        }
        out.append(",\"error\":{\"code\":").append(quote(e.getStatus().getCode().name()))
            .append(",\"message\":").append(quote(String.valueOf(e.getStatus().getDescription())))
            .append(",\"reason\":").append(quote(reason))
            .append(",\"domain\":").append(quote(domain)).append("}");
      }
      System.out.println(out.append("}"));
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }
}
