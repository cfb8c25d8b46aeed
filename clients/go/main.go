// A Go client of the example app (examples/contacts_app.py), built only from the files
// `nexus proto export` writes: protoc-gen-go and protoc-gen-go-grpc generate its
// packages without extra flags (the exported files carry their go_package).
//
// It runs the create_contact workflow, streams search_contacts, creates and lists
// contacts through the typed ContactService with a filter, and reads an error's
// google.rpc.ErrorInfo. It prints one JSON document (the steps' results) on stdout;
// tests/proto/test_export_clients.py builds and runs it. See clients/go/README.md.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	modelsv1 "nexus.local/api/nexus/models/v1"
	workflowv1 "nexus.local/api/nexus/workflow/v1"
)

// asJSON is a message in proto3 JSON, with the field names as declared.
func asJSON(m proto.Message) json.RawMessage {
	data, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(m)
	if err != nil {
		fail("marshal", err)
	}
	return data
}

func fail(step string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", step, err)
	os.Exit(1)
}

func mustStruct(fields map[string]interface{}) *structpb.Struct {
	s, err := structpb.NewStruct(fields)
	if err != nil {
		fail("struct", err)
	}
	return s
}

func main() {
	server := flag.String("server", "127.0.0.1:50051", "the Nexus gRPC server (host:port)")
	name := flag.String("name", "Ada Lovelace", "the name of the contact the workflow creates")
	email := flag.String("email", "ada@example.org", "its email (gh.EMAIL: the typed record's)")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, *server, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		fail("dial", err)
	}
	defer conn.Close()
	workflows := workflowv1.NewWorkflowServiceClient(conn)
	contacts := modelsv1.NewContactServiceClient(conn)
	out := map[string]interface{}{}

	// a workflow: create_contact
	execution, err := workflows.ExecuteWorkflow(ctx, &workflowv1.ExecuteWorkflowRequest{
		Name:   "create_contact",
		Inputs: mustStruct(map[string]interface{}{"name": *name, "email": *email}),
	})
	if err != nil {
		fail("ExecuteWorkflow", err)
	}
	out["execution"] = asJSON(execution)

	// a stream: search_contacts finds that contact
	stream, err := workflows.StreamExecution(ctx, &workflowv1.StreamExecutionRequest{
		Name:   "search_contacts",
		Inputs: mustStruct(map[string]interface{}{"query": *name}),
	})
	if err != nil {
		fail("StreamExecution", err)
	}
	var events []json.RawMessage
	for len(events) < 100 {
		event, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail("StreamExecution.Recv", err)
		}
		events = append(events, asJSON(event))
	}
	out["events"] = events

	// typed CRUD: create a contact, then list with a filter
	score := int64(7)
	company := "Analytical Engines"
	created, err := contacts.CreateContact(ctx, &modelsv1.CreateContactRequest{
		Contact: &modelsv1.Contact{
			Name: proto.String("Grace Hopper"), Email: proto.String("gh." + *email),
			Company: &company, Score: &score,
		},
	})
	if err != nil {
		fail("CreateContact", err)
	}
	out["created"] = asJSON(created)
	listed, err := contacts.ListContacts(ctx, &modelsv1.ListContactsRequest{
		Filter: mustStruct(map[string]interface{}{
			"email": "gh." + *email, "score": map[string]interface{}{"$gte": 5},
		}),
		OrderBy: "name",
	})
	if err != nil {
		fail("ListContacts", err)
	}
	out["listed"] = asJSON(listed)

	// an error with details: a contact that does not exist
	_, err = contacts.GetContact(ctx, &modelsv1.GetContactRequest{Id: "no-such-contact"})
	st, ok := status.FromError(err)
	if err == nil || !ok {
		fail("GetContact", fmt.Errorf("expected a gRPC error, got %v", err))
	}
	errorOut := map[string]interface{}{"code": st.Code().String(), "message": st.Message()}
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			errorOut["reason"] = info.GetReason()
			errorOut["domain"] = info.GetDomain()
		}
	}
	out["error"] = errorOut

	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("encode", err)
	}
}
